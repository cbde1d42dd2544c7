"""The native CPU kernels (dsv2/kernels) against dsv2's torch paths, which are tested against the references."""

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsv2.generate
from dsv2 import LLM, DeepseekV2ForCausalLM, SamplingParams, kernels
from dsv2.engine.runner import PagedLatentCache, PagedStepCache
from dsv2.model.attention import MultiHeadLatentAttention
from dsv2.model.cache import LatentCache, fused_decode_applies
from dsv2.model.decode_plan import DECODE_LAYER_SLOTS, DecodePlan
from dsv2.model.linear import SMALL_MATMUL_MAX_ROWS, Linear
from dsv2.model.moe import MoE, RoutedExperts
from dsv2.model.rope import RotaryEmbedding
from dsv2.model.transformer import DecoderLayer

from helpers import TINY_LITE, TINY_V2, randomize_, tiny_checkpoint, tiny_config, tiny_model

built = pytest.mark.skipif(kernels.cpu_ops() is None,
                           reason="needs an x86-64 Linux CPU with AVX-512 (BF16) and a C++ compiler")


@pytest.fixture(autouse=True, params=["amx", "avx512"])
def bf16_units(request):
    """Every test twice: with the bf16 paths on the AMX tiles (where the CPU has them) and on AVX-512 registers."""
    ops = kernels.cpu_ops()
    if ops is None:
        yield
        return
    if ops.use_amx(request.param == "amx") != (request.param == "amx"):
        ops.use_amx(True)
        pytest.skip("this CPU has no AMX")
    yield
    ops.use_amx(True)


def experts(E: int, H: int, inter: int, dtype: torch.dtype = torch.bfloat16) -> RoutedExperts:
    return randomize_(RoutedExperts(E, H, inter), std=0.1).to(dtype)


def assert_close_for(dtype: torch.dtype, got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16: the same roundings, only the order of float32 sums inside a product may differ; float32: sums only."""
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * tolerance,
                               atol=tolerance * want.abs().max().item())


def count_kernel_calls(monkeypatch) -> collections.Counter:
    """From now on, count the calls of each kernel (by name) that the model makes through `kernels.cpu_ops()`."""
    calls, ops = collections.Counter(), kernels.cpu_ops()

    class Spy:
        def __getattr__(self, name):
            return lambda *args: calls.update([name]) or getattr(ops, name)(*args)

    monkeypatch.setattr(kernels, "cpu_ops", lambda: Spy())
    return calls


def routed(module: RoutedExperts, x, ids, weights, owned=None, *, torch_path: bool = False) -> torch.Tensor:
    """The module's inference output: through the CPU kernel, or with it switched off (its torch paths)."""
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        if torch_path:
            patch.setattr(kernels, "cpu_ops", lambda: None)
        return module(x, ids, weights, owned)


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("N", "E", "k", "H", "inter"), [
    (1, 8, 2, 64, 32),  # one token (the torch path: one expert after another; the kernel: register tiles)
    (5, 8, 3, 128, 96),  # a few tokens (the torch path: grouped_mm; the kernel: register tiles, ≤ 2 per expert)
    (64, 16, 4, 256, 128),  # a decode batch (torch: capacity bmm; the kernel: bf16 AMX or 8 + 8, float32 8 + 8)
    (30, 4, 2, 64, 64),  # ~15 per expert: bf16 around one AMX group of 16, AVX-512 and float32 in groups of 8 and 7
])
def test_kernel_routed_experts_equal_the_torch_paths(dtype, N, E, k, H, inter):
    torch.manual_seed(N)
    module = experts(E, H, inter, dtype)
    x = torch.randn(N, H, dtype=dtype)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(N)])  # [N, k] distinct per token
    weights = torch.rand(N, k)
    assert module._kernel_applies(x, N * k) is False  # gradients are enabled out here: training never takes it
    with torch.no_grad():
        assert module._kernel_applies(x, N * k)
    got = routed(module, x, ids, weights)
    ref = routed(module, x, ids, weights, torch_path=True)
    assert got.dtype == torch.float32 and got.shape == (N, H)
    assert_close_for(dtype, got, ref)


@built
def test_kernel_assignments_to_other_ranks_experts_add_nothing():
    module = experts(8, 64, 32)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 9], [3, 12], [8, 1], [7, 7 + 8], [2, 5], [15, 14]])  # ids ≥ 8: another rank's
    owned = ids < 8
    weights = torch.rand(6, 2)
    got = routed(module, x, ids, weights, owned)
    ref = routed(module, x, ids, weights, owned, torch_path=True)
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    assert (got[5] == 0).all()  # both of its experts live elsewhere


@built
def test_kernel_kernel_is_kept_out_of_what_it_does_not_cover():
    module = experts(8, 64, 32)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert module._kernel_applies(x, 8)
        assert not module._kernel_applies(x, 8 * 32 + 1)  # prefill-sized: grouped_mm
        assert not module._kernel_applies(x.float(), 8)  # float32 input, bf16 weights
        assert not experts(8, 64, 32, torch.float32)._kernel_applies(x, 8)  # bf16 input (autocast), float32 weights
        assert not module._kernel_applies(x.half(), 8)  # float16
        assert not experts(8, 64, 48)._kernel_applies(x, 8)  # intermediate size not a multiple of 32
    with pytest.raises(RuntimeError, match="x and the weights alike"):
        kernels.cpu_ops().routed_experts(x.float(), torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1),
                                         module.gate_proj, module.up_proj, module.down_proj)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        m = experts(8, 64, 48)
        kernels.cpu_ops().routed_experts(x, torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1),
                                         m.gate_proj, m.up_proj, m.down_proj)


def test_kernels_switch_off_by_environment(monkeypatch):
    assert kernels.kernels_enabled()
    monkeypatch.setenv("DSV2_CPU_KERNELS", "0")
    assert not kernels.kernels_enabled()
    assert kernels.cpu_ops.__wrapped__() is None  # uncached: asked again, it declines before building anything


def gathered_attention(q, layer, slots, lengths, value_dim, scale):
    """The torch path's computation: each sequence's context gathered by slot, SDPA with a length mask."""
    B, S = slots.shape
    context = layer.index_select(0, slots.flatten()).view(B, 1, S, -1)  # [B, 1, S, D]
    mask = (torch.arange(S) < lengths[:, None])[:, None, None, :].expand(B, 1, q.shape[1], S)
    out = F.scaled_dot_product_attention(q[:, None], context, context, attn_mask=mask, scale=scale)  # [B, 1, h, D]
    return out[:, 0, :, :value_dim]


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["scattered", "blocks"])
@pytest.mark.parametrize(("B", "S", "heads", "D", "value_dim"), [
    (3, 40, 4, 64, 48),  # fewer heads than a tile's 16 rows
    (2, 600, 20, 576, 512),  # V2's latent size; 3 chunks of ≤ 256 keys merged; a second, partial group of heads
])
def test_kernel_latent_attention_equals_sdpa_over_the_gathered_context(dtype, layout, B, S, heads, D, value_dim):
    torch.manual_seed(S)
    blocks = B * (S // 16 + 1) + 1
    layer = torch.randn(blocks * 16, D).to(dtype)  # one layer's slots
    if layout == "scattered":  # every key somewhere else: bf16 copies each 16 keys' rows together first
        slots = torch.randperm(blocks * 16)[: B * S].view(B, S)
    else:  # runs of 16 consecutive rows, as a paged cache's blocks: bf16 reads those in place (S % 16: a short run)
        order = torch.randperm(blocks)[: B * (S // 16 + 1)].view(B, -1)  # [B, blocks per sequence]
        slots = (order[:, :, None] * 16 + torch.arange(16)).view(B, -1)[:, :S].contiguous()
    lengths = torch.tensor([S, 1, S // 2][:B])
    q = (0.5 * torch.randn(B, heads, D)).to(dtype)
    got = kernels.cpu_ops().latent_attention(q, layer, slots, lengths, value_dim, D**-0.5)
    want = gathered_attention(q, layer, slots, lengths, value_dim, D**-0.5)
    assert got.shape == (B, heads, value_dim) and got.dtype == dtype
    assert_close_for(dtype, got, want)  # bf16: probabilities rounded for their product, as torch's fused kernel


# the attention kernel alone (entries of 64 values, sizes the whole-step kernel does not take: r = 48), the whole step
# in one kernel (`mla_decode`), without and with query compression
FUSED_CONFIGS = {
    "attention kernel": dict(kv_lora_rank=48, qk_rope_head_dim=16),
    "whole step": dict(kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32),
    "whole step, q_lora": dict(kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, q_lora_rank=32),
}


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("path", list(FUSED_CONFIGS))
def test_fused_decoding_equals_the_gathered_path(monkeypatch, path, paged, dtype):
    """A decode step of MLA through the kernels against the same step gathered and masked (SDPA): the output, and
    the latent the step wrote to the cache."""
    config = tiny_config(TINY_LITE, **FUSED_CONFIGS[path])
    D = config.kv_lora_rank + config.qk_rope_head_dim
    attention = randomize_(MultiHeadLatentAttention(config, layer_idx=1), std=0.2).to(dtype).eval()
    B, lengths = 3, torch.tensor([37, 5, 300])  # the step's token sits at position length − 1
    positions = (lengths - 1)[:, None]  # [B, 1]
    x = torch.randn(B, 1, config.hidden_size).to(dtype)
    cos, sin = RotaryEmbedding(config)(positions)  # [B, 1, d_R/2] float32
    calls = count_kernel_calls(monkeypatch)
    if paged:
        cache = PagedLatentCache(config, num_blocks=64, block_size=16, dtype=dtype, device="cpu")
        cache.data.normal_()
        tables = torch.randperm(64)[: B * 20].view(B, 20)  # each sequence's blocks, scattered
        context = torch.arange(300).expand(B, 300)
        read = tables.gather(1, context // 16) * 16 + context % 16
        read = torch.where(context < lengths[:, None], read, cache.trash_slot)
        write = read.gather(1, positions)

        def step(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
            step_cache = PagedStepCache(cache, write, read, mask=context[:, None, :] <= positions[:, :, None])
            step_cache.fused_decode_applies = lambda dtype, value_dim: fused
            return attention(x, cos, sin, positions, step_cache), cache.data[1, write[:, 0]].clone()
    else:
        cache = LatentCache(config, B, 320, dtype=dtype)
        cache.data.normal_()
        cache.seq_len = 300

        def step(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(LatentCache, "fused_decode_applies", lambda self, dtype, value_dim: fused)
                out = attention(x, cos, sin, positions, cache)
            cache._step_slots = None  # what the model's `advance` does after a step
            return out, cache.data[1, torch.arange(B), positions[:, 0]].clone()

    with torch.no_grad():
        assert fused_decode_applies(cache.data, dtype, config.kv_lora_rank)
        fused, fused_latent = step(True)
        fused_calls = set(calls)
        gathered, gathered_latent = step(False)
    assert fused_calls >= ({"mla_decode"} if path.startswith("whole step") else {"latent_attention", "small_matmul"})
    assert path.startswith("whole step") or "mla_decode" not in fused_calls
    assert_close_for(dtype, fused, gathered)
    assert_close_for(dtype, fused_latent, gathered_latent)
    assert fused.shape == (B, 1, config.hidden_size) and fused_latent.shape == (B, D)


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("G", "M", "N", "K"), [
    (1, 1, 40, 96),  # one row, as a linear layer decodes one token
    (1, 7, 37, 64),  # 7 rows in one pass (2 × 7 register tiles), a weight whose last 4-row block is short
    (1, 13, 21, 64),  # 8 rows, then 5
    (3, 16, 8, 32),  # per-head weights (MLA's W_UK / W_UV), 16 rows
    (2, 4, 130, 256),
    (16, 1, 256, 64),  # MLA's W_UK for one token: 16-row blocks of short rows
    (16, 1, 64, 256),  # and W_UV
])
def test_kernel_small_matmul_equals_the_exact_product(dtype, G, M, N, K):
    torch.manual_seed(M)
    x = torch.randn(M, G, K).to(dtype).transpose(0, 1)  # [G, M, K], strided over groups and rows
    weight = torch.randn(G, N, K).to(dtype)
    got = kernels.cpu_ops().small_matmul(x, weight)
    assert got.shape == (G, M, N) and got.dtype == dtype
    exact = x.double() @ weight.double().transpose(1, 2)
    # float32 sums, rounded to the dtype once: within the rounding of the largest value (plus float32's sums)
    tolerance = (2**-8 if dtype == torch.bfloat16 else 1e-6) * exact.abs().max().item()
    torch.testing.assert_close(got.double(), exact, atol=tolerance, rtol=0)
    if G == 1:  # a linear layer's form: x [..., K] · weight [N, K]ᵀ → [..., N], the same sums
        rows = x[0].reshape(M, 1, K)
        assert kernels.cpu_ops().small_matmul(rows, weight[0]).equal(got[0].view(M, 1, N))


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_small_matmul_one_row_gives_each_rows_own_sum(dtype):
    """One input row: the weight's rows in blocks (16 at a time on AMD) give each row's sum as that row alone does, bit
    for bit; a NaN in one row spoils only that row's value."""
    torch.manual_seed(0)
    x, weight = torch.randn(3, 1, 64).to(dtype), torch.randn(3, 37, 64).to(dtype)
    weight[1, 20, 5] = float("nan")
    ops = kernels.cpu_ops()
    got = ops.small_matmul(x, weight)  # [3, 1, 37]
    alone = torch.cat([ops.small_matmul(x, weight[:, n:n + 1]) for n in range(37)], dim=2)
    assert got.isnan().nonzero().tolist() == [[1, 0, 20]]
    assert torch.equal(got.nan_to_num(), alone.nan_to_num())


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_small_matmul_same_sums_from_an_aligned_weight_and_an_unaligned_one(dtype):
    """A 64-byte-aligned weight streams through non-temporal loads, any other through plain ones: the same sums, bit
    for bit (a weight 16 bytes past an aligned address takes the plain loads)."""
    torch.manual_seed(0)
    x, weight = torch.randn(2, 1, 96).to(dtype), torch.randn(2, 40, 96).to(dtype)

    def placed(offset: int) -> torch.Tensor:  # the weight ``offset`` bytes past a 64-byte boundary
        buffer = torch.empty(weight.numel() + 64, dtype=dtype)
        start = (-buffer.data_ptr() % 64 + offset) // dtype.itemsize
        return buffer[start:start + weight.numel()].view_as(weight).copy_(weight)

    aligned, shifted = placed(0), placed(16)
    assert aligned.data_ptr() % 64 == 0 and shifted.data_ptr() % 64 == 16
    ops = kernels.cpu_ops()
    assert torch.equal(ops.small_matmul(x, aligned), ops.small_matmul(x, shifted))


@built
def test_kernel_small_matmul_rejects_what_it_cannot_take():
    ops = kernels.cpu_ops()
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.small_matmul(torch.zeros(1, 1, 48, dtype=torch.bfloat16), torch.zeros(1, 8, 48, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="x and the weight alike"):
        ops.small_matmul(torch.zeros(1, 1, 32), torch.zeros(1, 8, 32, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"x \[G, M, K\] and weight \[G, N, K\]"):
        ops.small_matmul(torch.zeros(1, 1, 32), torch.zeros(2, 8, 32))


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decoding_linears_take_small_matmul_and_equal_torch(monkeypatch, dtype):
    """Linear layers and MLA's per-head W_UK / W_UV take the kernel for a few rows at inference, and give torch's
    product; more rows, gradients or autocast keep torch's paths."""
    calls = []
    ops = kernels.cpu_ops()

    class Spy:
        def __getattr__(self, name):
            return (lambda *args: calls.append(name) or getattr(ops, name)(*args)) if name == "small_matmul" \
                else getattr(ops, name)

    monkeypatch.setattr(kernels, "cpu_ops", lambda: Spy())
    layer = randomize_(Linear(96, 40), std=0.2).to(dtype)
    most = SMALL_MATMUL_MAX_ROWS[dtype]
    for rows, expect_kernel in ((1, True), (most, True), (most + 1, False)):
        x = torch.randn(1, rows, 96, dtype=dtype)
        calls.clear()
        with torch.no_grad():
            got = layer(x)
        assert calls == (["small_matmul"] if expect_kernel else []), rows
        assert_close_for(dtype, got, F.linear(x, layer.weight, layer.bias))
    calls.clear()
    layer(torch.randn(1, 96, dtype=dtype))  # gradients on
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        Linear(96, 40)(torch.randn(1, 96))  # float32 weights under autocast
    assert calls == []

    config = tiny_config(TINY_LITE, qk_nope_head_dim=32)  # K of both products a multiple of 32: d = 32, r = 32
    attention = randomize_(MultiHeadLatentAttention(config, layer_idx=0), std=0.2).to(dtype)
    q_nope = torch.randn(2, 1, attention.num_heads, attention.nope_dim, dtype=dtype)
    out_latent = torch.randn(2, attention.num_heads, 1, attention.kv_rank, dtype=dtype)
    with torch.no_grad():
        w_uk_t, w_uv = attention.absorbed_weights()
        q = attention.absorbed_query(q_nope, torch.zeros(2, 1, attention.num_heads, 0, dtype=dtype))
        out = attention.unabsorb(out_latent)
    assert calls == ["small_matmul", "small_matmul"]
    assert_close_for(dtype, q, torch.einsum("bthd,hrd->bthr", q_nope, w_uk_t))
    assert_close_for(dtype, out, torch.einsum("bhtr,hvr->bthv", out_latent, w_uv))


@built
@pytest.mark.parametrize(("base", "sizes"), [(TINY_LITE, "whole step"), (TINY_V2, "whole step, q_lora")],
                         ids=["lite", "v2"])
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_decoding_through_the_kernels_gives_the_torch_paths_tokens(monkeypatch, base, sizes, chunk):
    """float32 greedy decoding of a model whose sizes every kernel takes (the whole MLA step in one call, the
    experts, the products; up to ``chunk`` steps in one `decode_greedy` call) against the same model on dsv2's torch
    paths, token for token."""
    model = tiny_model(base, **FUSED_CONFIGS[sizes], moe_intermediate_size=32, intermediate_size=96)
    generate = dsv2.generate.generate
    monkeypatch.setattr(dsv2.generate.GreedyChunks, "CHUNK_SECONDS", 1e9)
    monkeypatch.setattr(dsv2.generate.GreedyChunks, "MAX_CHUNK", chunk)
    prompts = torch.randint(0, 128, (2, 9))
    calls = count_kernel_calls(monkeypatch)
    with_kernels = generate(model, prompts, max_new_tokens=12, ignore_eos=True)
    # 11 decode steps: the first alone (timed), in one call through the 3 layers, then the other 10 in chunks (one at
    # a time: the same calls); the MoE kernel also takes the prefill's 18 tokens where that few rows go through
    # small_matmul (float32 on AMD)
    prefill = 2 if prompts.numel() <= SMALL_MATMUL_MAX_ROWS[torch.float32] else 0
    chunked = {1: 0, 4: 3, 16: 1}[chunk]
    assert calls["decode_layers"] == 11 - 10 * (chunk > 1) and calls["decode_greedy"] == chunked
    assert calls["moe_decode"] == prefill and calls["mla_decode"] == 0
    monkeypatch.setattr(kernels, "cpu_ops", lambda: None)
    assert generate(model, prompts, max_new_tokens=12, ignore_eos=True).equal(with_kernels)


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 3, 8, 16])
@pytest.mark.parametrize("routing", [
    dict(),  # greedy, weights × routed_scaling_factor (1.0)
    dict(norm_topk_prob=True),  # greedy, weights renormalized
    dict(TINY_V2),  # group-limited greedy over 4 groups, × 16, two shared experts
    dict(n_shared_experts=None),  # no shared experts
], ids=["greedy", "normalized", "group-limited", "no-shared"])
def test_moe_decode_equals_the_torch_paths(monkeypatch, routing, tokens, dtype):
    """A MoE layer's decoding step in one kernel call against the layer on dsv2's torch paths."""
    config = tiny_config({**TINY_LITE, **routing})
    moe = randomize_(MoE(config), std=0.2).to(dtype).eval()
    x = torch.randn(1, tokens, config.hidden_size).to(dtype)
    with torch.no_grad():
        assert moe.decode_kernel_applies(x)
        got, stats = moe(x, with_stats=False)
        assert stats is None
        monkeypatch.setattr(kernels, "cpu_ops", lambda: None)
        want, _ = moe(x, with_stats=False)
    assert_close_for(dtype, got, want)


@built
def test_moe_decode_takes_a_gate_kept_in_float32(monkeypatch):
    """The gate's scores are computed in float32 from whatever dtype its weight has: a bf16 layer whose gate was
    kept in float32 routes as the torch path does."""
    moe = randomize_(MoE(tiny_config(TINY_LITE)), std=0.2).to(torch.bfloat16).eval()
    moe.gate.float()
    x = torch.randn(1, 4, 64).to(torch.bfloat16)
    with torch.no_grad():
        assert moe.decode_kernel_applies(x)
        got, _ = moe(x, with_stats=False)
        monkeypatch.setattr(kernels, "cpu_ops", lambda: None)
        want, _ = moe(x, with_stats=False)
    assert_close_for(torch.bfloat16, got, want)


@built
def test_moe_decode_is_kept_out_of_training_and_large_batches():
    moe = randomize_(MoE(tiny_config(TINY_LITE)), std=0.2)
    x = torch.randn(1, 3, 64)
    assert not moe.decode_kernel_applies(x)  # gradients on
    with torch.no_grad():
        assert moe.decode_kernel_applies(x)
        assert not moe.decode_kernel_applies(torch.randn(1, SMALL_MATMUL_MAX_ROWS[torch.float32] + 1, 64))
        assert not moe.decode_kernel_applies(x.to(torch.bfloat16))  # not the experts' dtype


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [2, 8, 16])  # bf16 5-16 rows: AMX (or 2 passes); 16: the most either takes
def test_decoder_layer_in_two_kernel_calls_equals_the_torch_paths(monkeypatch, rows, dtype):
    """A decoder layer's decoding step as two calls (norm + attention + residual, norm + MoE + residual) against
    the layer on dsv2's torch paths: its output and the latents it wrote."""
    assert rows <= SMALL_MATMUL_MAX_ROWS[dtype]
    config = tiny_config(TINY_V2, **FUSED_CONFIGS["whole step, q_lora"])
    layer = randomize_(DecoderLayer(config, layer_idx=1), std=0.2).to(dtype).eval()
    positions = torch.randint(0, 41, (rows, 1)).index_fill_(0, torch.tensor([0]), 40)  # [B, 1], one at the end
    h = torch.randn(rows, 1, config.hidden_size).to(dtype)
    cos, sin = RotaryEmbedding(config)(positions)
    def step() -> tuple[torch.Tensor, torch.Tensor]:
        cache = LatentCache(config, rows, 64, dtype=dtype)
        cache.data.normal_(generator=torch.Generator().manual_seed(0))
        cache.seq_len = 41
        with torch.no_grad():
            out, stats = layer(h, cos, sin, positions, cache, "auto", with_stats=False)
        assert stats is None
        return out, cache.data[1, torch.arange(rows), positions[:, 0]]

    calls = count_kernel_calls(monkeypatch)
    got, got_latent = step()
    assert calls == {"mla_decode": 1, "moe_decode": 1}
    monkeypatch.setattr(kernels, "cpu_ops", lambda: None)
    want, want_latent = step()
    assert_close_for(dtype, got, want)
    assert_close_for(dtype, got_latent, want_latent)


@built
def test_mla_decode_rejects_sizes_that_disagree():
    config = tiny_config(TINY_LITE, **FUSED_CONFIGS["whole step"])
    attention = randomize_(MultiHeadLatentAttention(config, layer_idx=0), std=0.2).eval()
    cache = LatentCache(config, 1, 8)
    positions = torch.tensor([[0]])
    cos, sin = RotaryEmbedding(config)(positions)
    with torch.no_grad():
        w_uk_t, w_uv = attention.absorbed_weights()
        layer, write, read, lengths = cache.step_slots(0, positions)
        args = [torch.randn(1, config.hidden_size), attention.q_proj.weight, None, None, None,
                attention.kv_a_proj_with_mqa.weight, attention.kv_a_layernorm.weight, w_uk_t, w_uv,
                attention.o_proj.weight, cos[:, 0], sin[:, 0], layer, write, read, lengths, 1e-6, 0.1]
        assert kernels.cpu_ops().mla_decode(*args).shape == (1, config.hidden_size)
        args[10], args[11] = cos[:, 0, :4].contiguous(), sin[:, 0, :4].contiguous()  # half the rotary pairs
        with pytest.raises(RuntimeError, match="sizes disagree"):
            kernels.cpu_ops().mla_decode(*args)


@torch.no_grad()
def one_token_step() -> tuple[DeepseekV2ForCausalLM, LatentCache, DecodePlan, tuple]:
    """A tiny model whose decoding steps the kernels take, a cache of 8 slots holding 3 tokens, the plan of a step of
    one token at position 3, and that step's leading kernel arguments (token ids, embedding, positions, RoPE tables,
    the cache's tables)."""
    model = tiny_model(TINY_LITE, **FUSED_CONFIGS["whole step"], moe_intermediate_size=32, intermediate_size=96)
    cache = LatentCache(model.config, 1, 8)
    cache.seq_len = 3
    tokens, positions = torch.tensor([[1]]), torch.tensor([[3]])
    plan = model.decode_plan(tokens, cache)
    assert plan is not None
    layers, read = cache.step_tables()
    cos, sin = model.model.rotary.tables(read.shape[1], tokens.device)
    return model, cache, plan, (tokens, model.model.embed_tokens.weight, positions, cos, sin, layers, read)


@built
def test_decode_layers_checks_every_layer_before_writing_the_cache():
    """A weight that the one-call step cannot take (the last layer's o_proj in another dtype), a position past the
    row's slots and a token id past the vocabulary are errors that name them, raised before any layer has written its
    latent to the cache."""
    model, cache, plan, step = one_token_step()
    config, (tokens, read) = model.config, (step[0], step[-1])
    with torch.no_grad():
        weights = list(plan.refresh())
        last_o_proj = (config.num_hidden_layers - 1) * len(DECODE_LAYER_SLOTS) + DECODE_LAYER_SLOTS.index("o_proj")
        weights[last_o_proj] = weights[last_o_proj].double()
        before = cache.data.clone()
        with pytest.raises(RuntimeError, match=r"a weight: contiguous on the CPU, in x's dtype.*Double"):
            kernels.cpu_ops().decode_layers(*step, weights, plan.eps, plan.softmax_scale, *plan.routing)
        assert torch.equal(cache.data, before)
        weights[last_o_proj] = weights[last_o_proj].to(torch.float32)
        beyond = torch.tensor([[read.shape[1]]])  # past the row's slots
        with pytest.raises(RuntimeError, match=r"row 0's position \d+ is outside the RoPE tables"):
            kernels.cpu_ops().decode_layers(tokens, step[1], beyond, *step[3:], weights, plan.eps, plan.softmax_scale,
                                            *plan.routing)
        with pytest.raises(RuntimeError, match=f"token id {config.vocab_size} .* outside the embedding's"):
            kernels.cpu_ops().decode_layers(torch.tensor([[config.vocab_size]]), *step[1:], weights, plan.eps,
                                            plan.softmax_scale, *plan.routing)
        assert torch.equal(cache.data, before)
        kernels.cpu_ops().decode_layers(*step, weights, plan.eps, plan.softmax_scale, *plan.routing)  # as it was: runs
        assert not torch.equal(cache.data, before)


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("base", "sizes"), [(TINY_LITE, "whole step"), (TINY_V2, "whole step, q_lora")],
                         ids=["lite", "v2"])
def test_greedy_steps_in_one_call_equal_the_steps_one_by_one(base, sizes, dtype):
    """`decode_greedy` (several greedy steps in one kernel call) against forward steps and argmax, for 3 rows at
    different positions: the same tokens, the same cache bits, the same cache length; it ends early after a step
    where every row has drawn a stop id or was finished already."""
    model = tiny_model(base, **FUSED_CONFIGS[sizes], moe_intermediate_size=32, intermediate_size=96).to(dtype)
    config = model.config
    tokens, positions = torch.tensor([[5], [9], [77]]), torch.tensor([[6], [2], [4]])  # [B, 1] each

    def prefilled() -> LatentCache:
        cache = LatentCache(config, 3, 16, dtype=dtype)
        cache.data.normal_(generator=torch.Generator().manual_seed(0))
        cache.seq_len = 7
        return cache

    with torch.no_grad():
        cache, step_tokens, at = prefilled(), tokens, positions
        want = []
        for _ in range(6):
            step_tokens = model(step_tokens, positions=at, cache=cache).max(dim=-1).indices  # [B, 1]
            want.append(step_tokens[:, 0])
            at = at + 1
        want = torch.stack(want, dim=1)  # [B, 6]
        one_call = prefilled()
        got = model.decode_greedy(tokens, positions, one_call, 6)
    assert got.tolist() == want.tolist()
    assert torch.equal(one_call.data, cache.data) and one_call.seq_len == cache.seq_len == 13
    # rows 0 and 1 stop at their third token's id (row 2 counts as finished): the call ends after 3 steps
    stops = {int(want[0, 2]), int(want[1, 2])}
    if not stops & {*want[0, :2].tolist(), *want[1, :2].tolist()}:  # neither drew one earlier
        ended = model.decode_greedy(tokens, positions, prefilled(), 6, stop_ids=stops, finished_rows=[2])
        assert ended.tolist() == want[:, :3].tolist()
    with pytest.raises(ValueError, match="latent cache is full: 7 cached \\+ 10 new tokens > max_len=16"):
        model.decode_greedy(tokens, positions, prefilled(), 10)


@built
def test_greedy_steps_in_one_call_check_their_last_position_and_leave_hooked_models_alone():
    """The kernel names a row whose last position would fall outside its read slots (before writing the cache); the
    model's `decode_greedy` declines (None) where a hook on the model, its final norm or its head must see each
    step, and `generate` then calls forward at every step."""
    model, cache, plan, step = one_token_step()
    tokens, positions = step[0], step[2]
    with torch.no_grad():
        before = cache.data.clone()
        with pytest.raises(RuntimeError, match=r"row 0's last position 8 \(6 steps\) is outside"):
            kernels.cpu_ops().decode_greedy(*step, plan.refresh(), plan.eps, plan.softmax_scale, *plan.routing,
                                            model.model.norm.weight, model.model.norm.eps, model.lm_head.weight, 6)
        assert torch.equal(cache.data, before)
    prompt = torch.randint(0, 128, (1, 5))
    plain = dsv2.generate.generate(model, prompt, max_new_tokens=20, ignore_eos=True)
    for module in (model, model.model.norm, model.lm_head):
        calls = collections.Counter()
        handle = module.register_forward_pre_hook(lambda *_, seen=calls: seen.update(["forward"]))
        try:
            assert model.decode_greedy(tokens, positions, cache, 2) is None
            assert dsv2.generate.generate(model, prompt, max_new_tokens=20, ignore_eos=True).equal(plain)
        finally:
            handle.remove()
        assert calls["forward"] == 20  # prefill + 19 steps, each through forward (and the norm, the head)


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hooks_inside_a_layer_see_every_step(dtype):
    """The fused decoding calls (a layer's halves, every layer of a step, several greedy steps) compute modules
    without calling them. A forward hook on any module inside a layer sends the steps through the modules' own
    forward instead: it runs at every step (and at the prefill), the other layers keep their kernels, and float32
    tokens stay the same (bf16's torch paths round differently from the kernels)."""
    model = tiny_model(TINY_V2, **FUSED_CONFIGS["whole step, q_lora"], moe_intermediate_size=32,
                       intermediate_size=96).to(dtype)
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    plain = dsv2.generate.generate(model, prompt, max_new_tokens=12, ignore_eos=True)
    dense, layer = model.model.layers[0], model.model.layers[1]
    attention, moe = layer.self_attn, layer.mlp
    for name, module in [("input norm", layer.input_layernorm), ("attention", attention),
                         ("q_a_proj", attention.q_a_proj), ("kv_a_layernorm", attention.kv_a_layernorm),
                         ("o_proj", attention.o_proj), ("post-attention norm", layer.post_attention_layernorm),
                         ("moe", moe), ("gate", moe.gate), ("routed experts", moe.experts),
                         ("shared down_proj", moe.shared_experts.down_proj), ("dense up_proj", dense.mlp.up_proj)]:
        calls = []
        handle = module.register_forward_hook(lambda *_, seen=calls: seen.append(1))
        with pytest.MonkeyPatch.context() as patch:
            runs = count_kernel_calls(patch)
            try:
                tokens = dsv2.generate.generate(model, prompt, max_new_tokens=12, ignore_eos=True)
            finally:
                handle.remove()
        assert len(calls) == 12, name  # the prefill and 11 steps
        assert "decode_layers" not in runs and "decode_greedy" not in runs and runs["mla_decode"] > 0, name
        if dtype == torch.float32:
            assert tokens.equal(plain), name


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize(("base", "sizes"), [(TINY_LITE, "whole step"), (TINY_V2, "whole step, q_lora")],
                         ids=["lite", "v2"])
def test_a_step_through_every_layer_in_one_call_equals_the_layers_own_calls(monkeypatch, base, sizes, paged, rows,
                                                                            dtype):
    """`decode_layers` (the model's decoding step in one kernel call) against the same step layer by layer (the
    attention and MoE kernels, the dense layer's MLP through torch): logits and every latent written."""
    model = tiny_model(base, **FUSED_CONFIGS[sizes], moe_intermediate_size=32, intermediate_size=96).to(dtype)
    config = model.config
    positions = torch.randint(0, 40, (rows, 1)).index_fill_(0, torch.tensor([0]), 39)  # [B, 1], one at the end
    tokens = torch.randint(0, config.vocab_size, (rows, 1))
    def step(whole: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if paged:
            cache = PagedLatentCache(config, num_blocks=40, block_size=16, dtype=dtype, device="cpu")  # ≥ 16 × 40 slots
            cache.data.normal_(generator=torch.Generator().manual_seed(0))
            read = torch.randperm(cache.num_slots, generator=torch.Generator().manual_seed(1))[: rows * 40]
            read = read.view(rows, 40)  # [B, S] every sequence's slots, scattered
            read = torch.where(torch.arange(40) <= positions, read, cache.trash_slot)
            write = read.gather(1, positions)
            step_cache, written = PagedStepCache(cache, write, read, mask=None), cache.data[:, write[:, 0]]
        else:
            step_cache = LatentCache(config, rows, 48, dtype=dtype)
            step_cache.data.normal_(generator=torch.Generator().manual_seed(0))
            step_cache.seq_len = 39
            written = step_cache.data[:, torch.arange(rows), positions[:, 0]]
        with pytest.MonkeyPatch.context() as patch, torch.no_grad():
            if not whole:
                patch.setattr(type(model), "decode_plan", lambda self, h, cache: None)
            logits = model(tokens, positions=positions, cache=step_cache)
        return logits, step_cache.cache.data[:, write[:, 0]] if paged else written

    calls = count_kernel_calls(monkeypatch)
    got, got_latents = step(whole=True)
    assert calls == {"decode_layers": 1}  # the final norm and the head's product in the same call
    calls.clear()
    heads = []  # a hook on the head runs: the one call leaves the head's product to the module
    handle = model.lm_head.register_forward_hook(lambda module, args, out: heads.append(args[0].shape))
    try:
        head_hooked, _ = step(whole=True)
    finally:
        handle.remove()
    assert heads == [(rows, 1, config.hidden_size)] and calls == {"decode_layers": 1, "small_matmul": 1}
    assert torch.equal(head_hooked, got)  # the same product, rounded alike
    calls.clear()
    seen = []  # a hook on a layer keeps the layers' own calls, which run it
    handle = model.model.layers[1].register_forward_hook(lambda module, args, out: seen.append(out[0].shape))
    try:
        hooked, _ = step(whole=True)
    finally:
        handle.remove()
    assert seen == [(rows, 1, config.hidden_size)] and calls["mla_decode"] == 3 and "decode_layers" not in calls
    calls.clear()
    normed = []  # a hook on the final norm runs: the one call leaves that norm to the module
    handle = model.model.norm.register_forward_hook(lambda module, args, out: normed.append(args[0].shape))
    try:
        norm_hooked, _ = step(whole=True)
    finally:
        handle.remove()
    assert normed == [(rows, 1, config.hidden_size)] and calls == {"decode_layers": 1, "small_matmul": 1}
    assert_close_for(dtype, norm_hooked, got)  # the kernel's norm against RMSNorm's (float32 sums in other orders)
    calls.clear()
    want, want_latents = step(whole=False)
    assert calls["mla_decode"] == 3 and calls["moe_decode"] == 2 and "decode_layers" not in calls
    assert_close_for(dtype, got, want)  # the dense MLP's SiLU: std::exp here, torch's vectorized exp there
    assert torch.equal(hooked, want)
    assert torch.equal(got_latents[0], want_latents[0])  # the first layer's, before any MLP: the same kernel
    assert_close_for(dtype, got_latents, want_latents)


@built
def test_a_decoding_steps_plan_is_kept_until_the_model_changes(monkeypatch):
    """`decode_plan` checks the model once per kind of step; a replaced module, a weight changed in place, a new
    dtype and a part of the model converted on its own all show in the next step, which equals the layers' own
    calls."""
    model = tiny_model(TINY_LITE, **FUSED_CONFIGS["whole step"], moe_intermediate_size=32, intermediate_size=96)
    model = model.to(torch.bfloat16)
    config = model.config
    checks = collections.Counter()
    whole_step_applies = type(model).whole_step_applies
    monkeypatch.setattr(type(model), "whole_step_applies",
                        lambda self, h, cache: checks.update(["model"]) or whole_step_applies(self, h, cache))
    calls = count_kernel_calls(monkeypatch)
    tokens, positions = torch.randint(0, config.vocab_size, (2, 1)), torch.tensor([[8], [5]])

    def step(whole: bool = True) -> torch.Tensor:
        cache = LatentCache(config, 2, 16, dtype=model.dtype)
        cache.data.normal_(generator=torch.Generator().manual_seed(0))
        cache.seq_len = 8
        with pytest.MonkeyPatch.context() as patch, torch.no_grad():
            if not whole:
                patch.setattr(type(model), "decode_plan", lambda self, h, cache: None)
            return model(tokens, positions=positions, cache=cache)

    def step_equals_the_layers_own_calls() -> None:
        got = step()
        assert_close_for(model.dtype, got, step(whole=False))

    for _ in range(3):
        step()
    assert checks["model"] == 1 and calls["decode_layers"] == 3
    attention = model.model.layers[1].self_attn
    attention.o_proj = randomize_(Linear(attention.o_proj.in_features, attention.o_proj.out_features, bias=False),
                                  seed=1).to(model.dtype)
    step_equals_the_layers_own_calls()
    assert checks["model"] == 2
    with torch.no_grad():
        attention.kv_b_proj.weight.mul_(-1)  # W_UKᵀ and W_UV are rebuilt from it
    step_equals_the_layers_own_calls()
    assert checks["model"] == 2
    model.float()
    step_equals_the_layers_own_calls()
    assert checks["model"] == 3 and calls["decode_layers"] == 6
    layer = model.model.layers[1]
    layer.to(torch.bfloat16)  # a part converted on its own keeps the Parameter objects: the model's plan is kept
    with pytest.raises(RuntimeError, match="same dtype"):  # the call refuses a weight; planned again, the step goes
        step()  # layer by layer, where mixed dtypes are an error too
    assert checks["model"] == 4 and calls["decode_layers"] == 7
    layer.float()  # converted back: the next step is planned again and takes the one call
    step_equals_the_layers_own_calls()
    assert checks["model"] == 5 and calls["decode_layers"] == 8


@built
def test_a_wrapped_embedding_keeps_the_step_out_of_the_one_call(monkeypatch):
    """An embedding module that the one-call step cannot read (a wrapper without a weight of its own) runs itself:
    the step goes layer by layer and gives the same logits as the one call on the plain embedding."""
    model = tiny_model(TINY_LITE, **FUSED_CONFIGS["whole step"], moe_intermediate_size=32, intermediate_size=96)
    config = model.config
    calls = count_kernel_calls(monkeypatch)
    tokens, positions = torch.randint(0, config.vocab_size, (2, 1)), torch.tensor([[8], [5]])

    def step() -> torch.Tensor:
        cache = LatentCache(config, 2, 16)
        cache.data.normal_(generator=torch.Generator().manual_seed(0))
        cache.seq_len = 8
        with torch.no_grad():
            return model(tokens, positions=positions, cache=cache)

    want = step()
    assert calls["decode_layers"] == 1
    model.model.embed_tokens = nn.Sequential(model.model.embed_tokens)
    got = step()
    assert calls["decode_layers"] == 1 and calls["mla_decode"] == config.num_hidden_layers
    assert_close_for(torch.float32, got, want)


@built
def test_tensor_parallel_projections_keep_the_layers_out_of_the_kernels():
    """A tensor-parallel o_proj or MLP down_proj (RowParallelLinear) sums its output over the ranks: the kernels,
    which read the weight directly, must leave such a layer to its modules."""
    from dsv2.parallel.tensor_parallel import RowParallelLinear

    model = tiny_model(TINY_LITE, **FUSED_CONFIGS["whole step"], moe_intermediate_size=32, intermediate_size=96)
    config = model.config
    cache = LatentCache(config, 1, 8)
    h = torch.randn(1, 1, config.hidden_size)
    dense, moe = model.model.layers[0], model.model.layers[1]
    with torch.no_grad():
        assert model.whole_step_applies(h, cache) and moe.moe_kernel_applies(h)
        attention = moe.self_attn
        row_parallel = RowParallelLinear(attention.o_proj.in_features, attention.o_proj.out_features, bias=False)
        del attention.__dict__["_fused_shapes_ok"]  # computed once per module; the swap below is a new module
        attention.o_proj = row_parallel
        assert not moe.attention_kernel_applies(h, cache, "auto") and not model.whole_step_applies(h, cache)
        mlp = dense.mlp
        mlp.down_proj = RowParallelLinear(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=False)
        assert not dense.whole_step_applies(h, cache, "auto")
        shared = moe.mlp.shared_experts
        shared.down_proj = RowParallelLinear(shared.down_proj.in_features, shared.down_proj.out_features, bias=False)
        assert not moe.moe_kernel_applies(h)


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_balanced_tasks_compute_what_static_ranges_do(dtype):
    """`parallel_tasks` hands a slow thread's remaining tasks to the others; each task computes the same either way."""
    ops = kernels.cpu_ops()
    x, weight = torch.randn(3, 256).to(dtype), torch.randn(4096, 256).to(dtype)
    module = experts(8, 64, 96, dtype)
    tokens = torch.randn(6, 64).to(dtype)
    ids, weights = torch.randint(0, 8, (6, 2)), torch.rand(6, 2)
    results = {}
    try:
        for balanced in (True, False):
            assert ops.balance_tasks(balanced) == balanced
            results[balanced] = (ops.small_matmul(x, weight), routed(module, tokens, ids, weights))
    finally:
        ops.balance_tasks(True)
    for got, want in zip(results[True], results[False], strict=True):
        assert torch.equal(got, want)


@built
def test_the_engine_over_the_kernels_generates_what_generate_does(monkeypatch, tmp_path):
    """The engine on a model of kernel sizes: continuous batching of 10 prompts (3 sharing a prefix: the prefix
    cache serves them), decode steps through `decode_layers` over the paged cache, against `generate` one prompt at
    a time. float32: in bf16 this random model has near-ties (top-2 logits one bf16 step apart) that the batched
    prefill's other matmul blocking flips."""
    checkpoint = tiny_checkpoint(tmp_path, TINY_V2, **FUSED_CONFIGS["whole step, q_lora"], moe_intermediate_size=32)
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(2, 400, (24,), generator=gen).tolist()
    prompts = [(shared if i < 3 else []) + torch.randint(2, 400, (3 + 5 * i,), generator=gen).tolist()
               for i in range(10)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    model = DeepseekV2ForCausalLM.from_pretrained(checkpoint, dtype="float32")
    want = [dsv2.generate.generate(model, torch.tensor([p]), max_new_tokens=10, ignore_eos=True)[0, len(p):].tolist()
            for p in prompts]
    calls = count_kernel_calls(monkeypatch)
    llm = LLM(model=checkpoint, dtype="float32", kv_cache_memory=4_000_000, block_size=8)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == want
    assert calls["decode_layers"] >= 9  # the batch's decode steps, each through every layer in one call
