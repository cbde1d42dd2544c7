import pytest
import torch

from dsv2 import DeepseekV2ForCausalLM, ModelConfig
from dsv2.info import summarize
from dsv2.weights import checkpoint_layout


@pytest.mark.parametrize(("preset", "params", "tensors"), [
    ("v2-lite", 15_706_484_224, 5_291),  # the published checkpoint: exactly these numbers
    ("v2", 235_741_434_880, 29_102),  # ≈ 235.74B in 29,102 tensors
])
def test_presets_count_the_published_parameters_and_tensors(preset, params, tensors):
    config = ModelConfig.preset(preset)
    assert summarize(config).total_params == params
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config)
    assert len(checkpoint_layout(model)) == tensors


def test_activated_parameters_and_cache_sizes():
    lite, v2 = summarize(ModelConfig.preset("v2-lite")), summarize(ModelConfig.preset("v2"))
    # the model card's 2.4B and 21B activated parameters count everything but the input embedding table
    assert 2.4e9 <= lite.activated_params - lite.embedding_params < 2.5e9
    assert 20.5e9 <= v2.activated_params - v2.embedding_params < 21.5e9
    assert lite.latent_cache_values == 27 * 576 == 15_552
    assert lite.expanded_cache_values == 27 * 16 * (192 + 128) == 138_240
    assert v2.latent_cache_values == 60 * 576 == 34_560
