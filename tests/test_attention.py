import pytest
import torch
import torch.nn.functional as F

import dsv2.model.attention as attention_module
from dsv2 import DeepseekV2ForCausalLM
from dsv2.model.attention import MultiHeadLatentAttention, causal_matmul_attention

from helpers import TINY_LITE, randomize_, tiny_config


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "masked"])
@pytest.mark.parametrize("block", [None, 2, 3], ids=["one block", "blocks of 2", "blocks of 3"])
@pytest.mark.parametrize("T, S", [(7, 7), (3, 10)], ids=["square", "bottom-right"])
def test_matmul_attention_equals_sdpa_values_and_gradients(T, S, block, masked):
    q = torch.randn(2, 4, T, 24, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, S, 24, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, S, 16, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 4, T, 16, dtype=torch.float64)
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T).expand(2, T, S)  # bottom-right causal
    if masked:  # each sequence its own keys, as the engine's prefills after a prefix-cache hit; every query sees one
        mask = (torch.rand(2, T, S, generator=torch.Generator().manual_seed(0)) < 0.6).index_fill_(2, torch.tensor([0]),
                                                                                                 True)
    grads = []
    for attend in (lambda: causal_matmul_attention(q, k, v, scale=0.3, block=block, mask=mask if masked else None),
                   lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=0.3)):
        out = attend()
        grads.append((out, *torch.autograd.grad(out, (q, k, v), upstream)))
    for ours, sdpa in zip(*grads, strict=True):
        torch.testing.assert_close(ours, sdpa, atol=1e-10, rtol=1e-10)


def test_bf16_training_takes_the_matmul_path_and_matches_the_fused_one(monkeypatch):
    # dense layers only: a top-k routing tie broken one way in one path and the other way in the other would move
    # the experts' gradients by far more than rounding does
    config = tiny_config(TINY_LITE, first_k_dense_replace=TINY_LITE["num_hidden_layers"])
    model = randomize_(DeepseekV2ForCausalLM(config), std=0.1).train()
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x[:, :-1], targets=x[:, 1:])
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return out.loss.detach(), grads

    taken = []
    pays = attention_module._matmul_attention_pays
    monkeypatch.setattr(attention_module, "_matmul_attention_pays",
                        lambda q, keys, masked=False: taken.append(pays(q, keys, masked)) or taken[-1])
    loss_matmul, grads_matmul = loss_and_grads()
    assert len(taken) == model.config.num_hidden_layers and all(taken)  # CPU, bf16 autocast, gradients, few keys
    monkeypatch.setattr(attention_module, "_matmul_attention_pays", lambda q, keys, masked=False: False)
    loss_fused, grads_fused = loss_and_grads()
    torch.testing.assert_close(loss_matmul, loss_fused, atol=2e-2, rtol=2e-2)
    # bf16 products round differently in the two paths (and per CPU: AMX or AVX512-BF16), so single elements near
    # zero can differ by a third: each gradient is compared as a whole, by its relative distance (~1-2% here; a
    # wrong mask or scale moves them by tens of percent)
    for (name, _), a, b in zip(model.named_parameters(), grads_matmul, grads_fused, strict=True):
        assert (a - b).norm() <= 5e-2 * b.norm(), f"{name}: gradients differ by {(a - b).norm() / b.norm():.2%}"


def test_matmul_path_only_where_it_pays():
    q = torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16)
    pays = attention_module._matmul_attention_pays
    blocks = attention_module.MATMUL_ATTENTION_BLOCK is not None
    longest = attention_module.MATMUL_ATTENTION_MAX_KEYS
    assert longest == (1024 if blocks else 512)  # training: longer sequences in blocks (no AMX)
    assert pays(q, longest)
    assert not pays(q, longest + 1)  # long sequences: the fused kernel
    assert not pays(q.float(), 512)  # float32: the fused kernel
    with torch.no_grad():  # inference: in blocks where the CPU has no AMX, else the fused kernel's forward
        assert pays(q, 4096) == blocks and not pays(q, 4097)
        assert pays(q, 640, masked=True) == blocks  # the engine's prefills after a prefix-cache hit
        assert pays(q.float(), 1024) == blocks and not pays(q.float(), 1025)  # float32: short prompts
        assert not pays(q.float(), 512, masked=True) and not pays(q.double(), 512)
    assert not pays(q, 512, masked=True)  # training never masks: the fused kernel if it ever did


@torch.no_grad()
def test_bf16_prefill_attention_matches_the_fused_kernel(monkeypatch):
    """bf16 inference: a fresh prefill (causal) and one after cached positions (the engine's per-sequence mask) take
    the blocked matmul attention where the CPU has no AMX, and agree with the flash kernel to bf16 rounding."""
    config = tiny_config(TINY_LITE)
    attention = randomize_(MultiHeadLatentAttention(config, 0)).to(torch.bfloat16)
    n_h, d, d_R, r = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                      config.kv_lora_rank)
    gen = torch.Generator().manual_seed(0)
    B, T = 2, (attention_module.MATMUL_ATTENTION_BLOCK or 128) + 2  # more than one block of queries
    S = T + 70

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    positions = torch.tensor([[S - T], [S - T - 10]]) + torch.arange(T)  # [B, T]: the second sequence is shorter
    masked = (torch.arange(S) <= positions[:, :, None], draw(B, T, n_h, d), draw(B, T, n_h, d_R), draw(B, S, r + d_R))
    fresh = (None, draw(B, T, n_h, d), draw(B, T, n_h, d_R), draw(B, T, r + d_R))
    pays, taken = attention_module._matmul_attention_pays, []
    for mask, q_nope, q_pe, latent in (fresh, masked):
        taken.clear()
        monkeypatch.setattr(attention_module, "_matmul_attention_pays",
                            lambda q, keys, masked=False: taken.append(pays(q, keys, masked)) or taken[-1])
        got = attention.expanded(q_nope, q_pe, latent, mask)
        assert taken == [attention_module.MATMUL_ATTENTION_BLOCK is not None]
        monkeypatch.setattr(attention_module, "_matmul_attention_pays", lambda q, keys, masked=False: False)
        want = attention.expanded(q_nope, q_pe, latent, mask)
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2 * want.abs().max().item(), rtol=0.05)


@pytest.mark.parametrize("masked", [False, True], ids=["every key", "masked"])
def test_latent_matmul_attention_equals_sdpa(masked):
    """The GPU's decoding path for the absorbed attention (two matmuls around a float32 softmax) against torch's
    fused attention over the same folded rows: one key/value head, the latent as both, its first r values kept."""
    from dsv2.model.attention import latent_matmul_attention

    gen = torch.Generator().manual_seed(0)
    B, M, S, D, r = 3, 8, 37, 40, 32
    q, latent = torch.randn(B, M, D, generator=gen, dtype=torch.float64), torch.randn(B, S, D, generator=gen,
                                                                                       dtype=torch.float64)
    mask = (torch.rand(B, 1, M, S, generator=gen) < 0.5).index_fill_(3, torch.tensor([0]), True) if masked else None
    expected = F.scaled_dot_product_attention(q[:, None], latent[:, None], latent[:, None], attn_mask=mask,
                                              scale=0.3)[:, 0, :, :r]
    torch.testing.assert_close(latent_matmul_attention(q, latent, mask, 0.3, r), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_a_cache_attending_over_all_its_slots_decodes_as_the_usual_one(batch):
    """`attend_all` (what a recorded CUDA graph needs: every step the shapes of the first) reads all max_len slots
    masked by position; the steps' logits equal the usual cache's, which reads the slots in use. Rows of a batch sit
    at their own positions, as `generate`'s ragged prompts do (row r's prompt is 8 - r tokens long)."""
    from dsv2 import LatentCache
    from dsv2.model import cuda_graph

    model = DeepseekV2ForCausalLM.from_config(tiny_config(TINY_LITE))
    randomize_(model).eval()
    ids = torch.randint(2, 128, (batch, 14), generator=torch.Generator().manual_seed(1))
    lengths = 8 - torch.arange(batch)[:, None]  # [B, 1]
    logits = []
    for attend_all in (False, True):
        cache = LatentCache(model.config, batch, 20)
        model(ids[:, :8], cache=cache)  # right-padded prompts: a row's steps overwrite its padding
        cache.attend_all = attend_all
        logits.append(torch.cat([model(ids[:, t:t + 1], positions=lengths + t - 8, cache=cache)
                                 for t in range(8, 14)], dim=1))
        assert cache.seq_len == 14
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
    assert not cuda_graph.graphs_apply(model, cache, 32)  # graphs are for CUDA caches only
