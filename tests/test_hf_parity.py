"""Oracle: transformers' native DeepseekV2ForCausalLM (5.24.0), random tiny checkpoints saved by transformers and
loaded through our real loader; and our checkpoints loaded by transformers.

transformers departs from the reference (remote) semantics in two corners — it ignores norm_topk_prob, and uses
yarn_get_mscale(factor) when mscale is set without mscale_all_dim — so those are checked against independent
implementations of the reference formulas instead (test_moe.py, test_rope.py)."""

import pytest
import torch

from dsv2 import DeepseekV2ForCausalLM

from helpers import TINY_LITE, TINY_V2, YARN, greedy_continuation, hf_model

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "lite": TINY_LITE,
    "v2": TINY_V2,
    "v2.5-mscale-1": {**TINY_V2, "rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}},
    "no-rope-scaling": {**TINY_LITE, "rope_scaling": None},
    "dense-0": {**TINY_V2, "first_k_dense_replace": 0},
    "dense-2": {**TINY_LITE, "first_k_dense_replace": 2},
    "attention-bias": {**TINY_V2, "attention_bias": True},
    "rms-norm-eps": {**TINY_V2, "rms_norm_eps": 1e-2},  # the latent norms keep 1e-6, as the reference's
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from the checkpoint transformers saved)."""
    hf = hf_model(CONFIGS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32)


@torch.no_grad()
def test_logits_match_at_every_position(pair):
    hf, ours = pair
    ids = torch.randint(2, 128, (2, 64))
    expected = hf(ids).logits
    got = ours(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 64, 128)
    err = (got - expected).abs().amax(dim=(0, 2))  # [64]: max |Δlogit| per position
    assert err.max() <= 1e-4, f"max |Δlogit| {err.max():.2e} at position {err.argmax()}"
    assert expected.abs().max() > 1.0  # the logits are far from zero, so 1e-4 is a real bound


@torch.no_grad()
def test_logits_match_at_far_positions(pair):
    """Positions far beyond original_max_position_embeddings, where YaRN's interpolation and m² matter most."""
    hf, ours = pair
    ids = torch.randint(2, 128, (1, 64))
    positions = torch.arange(2400, 2464)[None]
    err = (ours(ids, positions=positions) - hf(ids, position_ids=positions).logits).abs().max()
    assert err <= 1e-4


@torch.no_grad()
def test_greedy_continuation_matches(pair):
    hf, ours = pair
    prompt = torch.randint(2, 128, (1, 16))
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False)
    got = greedy_continuation(ours, prompt, 32)
    assert got.tolist() == expected[:, 16:].tolist()
    assert len(set(got[0].tolist())) > 3  # a non-degenerate continuation


@pytest.mark.parametrize("name", ["lite", "v2"])
@torch.no_grad()
def test_bf16_logits_are_as_close_to_float32_as_the_references(name, tmp_path):
    """bf16 rounds everywhere, so its logits move away from float32's; ours (prefill attention over bf16 scores in
    blocks where the CPU has no AMX, else the flash kernel) by no more than transformers' eager bf16 path, which
    computes as the reference does. Its own distance here: ~2% (lite) and 4-10% (v2) of the mean |logit|."""
    hf = hf_model(CONFIGS[name])
    hf.save_pretrained(tmp_path)
    reference = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                                   attn_implementation="eager").eval()
    ours = DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = torch.randint(2, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    float32 = hf(ids).logits

    def distance(logits: torch.Tensor) -> float:
        return ((logits.float() - float32).abs().mean() / float32.abs().mean()).item()

    got = ours(ids)
    assert got.dtype == torch.float32  # logits are returned in float32 whatever the model dtype
    assert distance(got) <= 1.25 * distance(reference(ids).logits)


@torch.no_grad()
def test_transformers_loads_our_checkpoint(tmp_path):
    from helpers import tiny_model

    ours = tiny_model(TINY_V2)
    ours.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    hf = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 48))
    assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4
