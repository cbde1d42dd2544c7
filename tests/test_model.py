import pytest
import torch

from dsv2 import CausalLMOutput, DeepseekV2ForCausalLM, LatentCache, ModelConfig

from helpers import TINY_LITE, TINY_V2, tiny_config, tiny_model


@pytest.fixture(params=["lite", "v2"])
def model(request):
    return tiny_model(TINY_LITE if request.param == "lite" else TINY_V2)


@torch.no_grad()
def test_absorbed_equals_expanded_without_cache(model):
    ids = torch.randint(0, 128, (2, 40))
    model.attn_impl = "expanded"
    expanded = model(ids)
    model.attn_impl = "absorbed"
    absorbed = model(ids)
    assert (absorbed - expanded).abs().max() <= 1e-5


@torch.no_grad()
def test_absorbed_equals_expanded_token_by_token_over_a_decode(model):
    ids = torch.randint(0, 128, (2, 48))
    full = model(ids)  # no cache, expanded, causal
    steps = {}
    for impl in ("absorbed", "expanded"):
        model.attn_impl = impl
        cache = LatentCache(model.config, batch_size=2, max_len=48)
        prefill = model(ids[:, :16], cache=cache)
        steps[impl] = torch.cat([prefill] + [model(ids[:, t:t + 1], cache=cache) for t in range(16, 48)], dim=1)
        assert cache.seq_len == 48
    assert (steps["absorbed"] - steps["expanded"]).abs().max() <= 1e-5  # every decoded token
    assert (steps["absorbed"] - full).abs().max() <= 1e-5


@torch.no_grad()
def test_chunked_prefill_over_the_cache_equals_one_pass(model):
    ids = torch.randint(0, 128, (1, 30))
    cache = LatentCache(model.config, batch_size=1, max_len=32)
    chunks = [model(ids[:, a:b], cache=cache) for a, b in ((0, 7), (7, 20), (20, 30))]
    assert (torch.cat(chunks, dim=1) - model(ids)).abs().max() <= 1e-5


def test_cache_holds_only_the_latent_and_rope_key():
    lite = ModelConfig.preset("v2-lite")
    cache = LatentCache(lite, batch_size=1, max_len=4, dtype=torch.bfloat16)
    assert cache.data.shape == (27, 1, 4, 576)
    assert cache.nbytes // 4 == 27 * 576 * 2  # 31,104 bytes per token
    model = tiny_model()
    small = LatentCache(model.config, batch_size=1, max_len=5)
    model(torch.zeros(1, 5, dtype=torch.long), cache=small)
    with pytest.raises(ValueError, match="latent cache is full"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=small)


@torch.no_grad()
def test_a_cache_of_another_batch_size_or_dtype_is_named():
    model = tiny_model()
    ids = torch.randint(2, 128, (2, 4))
    for batch in (1, 4):
        with pytest.raises(ValueError, match=f"input has 2 rows but the latent cache was made for batch_size={batch}"):
            model(ids, cache=LatentCache(model.config, batch_size=batch, max_len=8))
    bf16 = tiny_model(dtype=torch.bfloat16)
    for cache_model, other in ((bf16, torch.float32), (model, torch.bfloat16)):
        for tokens in (4, 1):  # a prefill and a decoding step
            cache = LatentCache(model.config, batch_size=1, max_len=8, dtype=other)
            with pytest.raises(ValueError, match=f"latent cache holds {other} but the model computes in "
                                                 f"{cache_model.dtype}"):
                cache_model(ids[:1, :tokens], cache=cache)
    cache = LatentCache(model.config, batch_size=1, max_len=8)  # float32 under bf16 autocast: the matmuls cast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids[:1], cache=cache)
        assert model(ids[:1, :1], cache=cache).shape == (1, 1, model.config.vocab_size)


def test_training_mode_returns_balance_loss_and_expert_load():
    model = tiny_model(TINY_V2).train()
    ids = torch.randint(0, 128, (2, 24))
    out = model(ids)
    assert isinstance(out, CausalLMOutput)
    assert out.logits.shape == (2, 24, 128)
    assert out.expert_load.shape == (2, 16)  # 2 MoE layers (the first is dense) × 16 routed experts
    assert (out.expert_load.sum(-1) == 2 * 24 * 3).all()
    assert out.aux_loss > 0
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert isinstance(model.eval()(ids), torch.Tensor)


def test_dense_model_and_moe_layer_frequency():
    dense = DeepseekV2ForCausalLM(tiny_config(n_routed_experts=None))
    assert not any("experts" in name for name, _ in dense.named_parameters())
    every_other = tiny_config(num_hidden_layers=5, first_k_dense_replace=1, moe_layer_freq=2)
    assert every_other.moe_layer_indices == [2, 4]
    out = tiny_model(num_hidden_layers=5, moe_layer_freq=2).train()(torch.randint(0, 128, (1, 8)))
    assert out.expert_load.shape[0] == 2


def test_tied_embeddings_stay_tied(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))

