import pytest
import torch
import torch.nn.functional as F

import dsv2.model.moe as moe_module
from dsv2 import kernels
from dsv2.model.moe import MoE, MoEGate

from helpers import TINY_LITE, TINY_V2, randomize_, tiny_config


def moe_layer(base=TINY_LITE, **overrides) -> MoE:
    return randomize_(MoE(tiny_config(base, **overrides)), std=0.2)


@pytest.fixture
def torch_experts(monkeypatch):
    """The routed experts' torch paths in bf16 inference, which the CPU kernel would take over (it is tested against
    them in test_kernels.py)."""
    monkeypatch.setattr(kernels, "cpu_ops", lambda: None)


def swiglu(x, gate, up, down):
    return F.silu(x @ gate.T) * (x @ up.T) @ down.T


@torch.no_grad()
def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The reference MoEGate + MoE, one token at a time, written from the formulas (section 3 of the reference)."""
    gate, experts = moe.gate, moe.experts
    out = []
    for token in x:  # [H]
        scores = torch.softmax(token @ gate.weight.T, dim=-1)  # [E]
        candidates = scores.clone()
        if gate.topk_method == "group_limited_greedy":
            per_group = scores.view(gate.n_group, -1)
            kept_groups = per_group.max(dim=-1).values.topk(gate.topk_group).indices
            dropped = torch.ones(gate.n_group, dtype=torch.bool)
            dropped[kept_groups] = False
            candidates.view(gate.n_group, -1)[dropped] = 0.0
        weights, ids = candidates.topk(gate.top_k)
        if gate.top_k > 1 and gate.norm_topk_prob:
            weights = weights / weights.sum()
        else:
            weights = weights * gate.routed_scaling_factor
        y = sum(w * swiglu(token, experts.gate_proj[e], experts.up_proj[e], experts.down_proj[e])
                for w, e in zip(weights, ids, strict=True))
        if moe.shared_experts is not None:
            s = moe.shared_experts
            y = y + swiglu(token, s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("overrides", [
    {},  # Lite: greedy, scaling 1
    {"base": TINY_V2},  # group-limited over 4 groups, scaling 16
    {"norm_topk_prob": True},  # renormalized top-k (transformers ignores this flag)
    {"base": TINY_V2, "norm_topk_prob": True},
    {"n_shared_experts": None},
    {"num_experts_per_tok": 1, "norm_topk_prob": True},  # k = 1: no renormalization, scaling applies
], ids=["greedy", "group-limited-x16", "norm-topk", "group-limited-norm-topk", "no-shared", "k1"])
def test_moe_equals_the_per_token_reference(overrides):
    moe = moe_layer(**overrides).eval()
    x = torch.randn(3, 7, 64)
    y, stats = moe(x)
    expected = reference_moe(moe, x.view(-1, 64)).view(3, 7, 64)
    scale = expected.abs().max().item()  # ×16 routing makes outputs large: bound the error relative to them
    torch.testing.assert_close(y, expected, atol=1e-6 * scale, rtol=1e-5)
    assert stats.expert_load.sum() == 3 * 7 * moe.top_k
    assert stats.balance_loss == 0  # eval mode


def test_group_limited_routing_stays_in_the_best_groups():
    moe = moe_layer(TINY_V2)
    x = torch.randn(50, 64)
    routing = moe.gate(x)
    group_best = routing.scores.view(50, 4, 4).max(dim=-1).values  # [N, G]
    top_groups = group_best.topk(2, dim=-1).indices  # [N, 2]
    chosen_groups = routing.expert_ids // 4  # [N, k]
    assert (chosen_groups[:, :, None] == top_groups[:, None, :]).any(-1).all()


def test_grouped_mm_and_per_expert_fallback_agree(monkeypatch, torch_experts):
    moe = moe_layer(TINY_V2).eval()
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        grouped, _ = moe(x)
        monkeypatch.setattr(moe_module, "_grouped_mm_works", lambda device_type, dtype: False)
        looped, _ = moe(x)
    torch.testing.assert_close(grouped, looped, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("path", ["grouped_mm", "fallback", "padded"])
def test_assignments_to_other_ranks_experts_cost_nothing_and_add_nothing(monkeypatch, torch_experts, path):
    experts = moe_layer(TINY_V2).experts  # expert parallel: this "rank" owns experts 0 .. E/2 - 1
    monkeypatch.setattr(moe_module, "_cpu_16bit", lambda x, weight: path == "padded")
    if path == "fallback":
        monkeypatch.setattr(moe_module, "_grouped_mm_works", lambda device_type, dtype: False)
    x, ids, weights = torch.randn(11, 64), torch.randint(0, experts.num_experts, (11, 3)), torch.rand(11, 3)
    owned = ids < experts.num_experts // 2
    computed = []
    monkeypatch.setattr(moe_module, "grouped_linear", _counting(moe_module.grouped_linear, computed))
    with torch.no_grad():
        got = experts(x, torch.where(owned, ids, 10**6), weights, owned)  # other ranks' ids mean nothing here
        expected = experts(x, ids, weights * owned)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    if path != "padded":  # rows given to experts: the owned ones only
        assert computed[0] == int(owned.sum()) and computed[3] == 3 * 11


def test_padded_decode_path_equals_grouped_mm(monkeypatch, torch_experts):
    moe = moe_layer(TINY_V2).eval().to(torch.bfloat16)  # the path is for 16-bit matmuls on CPU
    x = torch.randn(4, 1, 64, dtype=torch.bfloat16)  # a decode step of 4 sequences: few rows per expert
    counts = []
    monkeypatch.setattr(moe_module, "_few_rows_per_expert", _recording(moe_module._few_rows_per_expert, counts))
    with torch.no_grad():
        padded, _ = moe(x)
        assert counts == [True]  # it took the padded path
        monkeypatch.setattr(moe_module, "_few_rows_per_expert", lambda counts: False)
        grouped, _ = moe(x)
    torch.testing.assert_close(padded.float(), grouped.float(), atol=2e-2, rtol=2e-2)
    assert not moe_module._cpu_16bit(x.float(), moe.experts.gate_proj.float())  # float32: grouped_mm
    assert not moe_module._few_rows_per_expert(torch.tensor([0, 0, 3, 0]))  # 1 expert of 4 in use: grouped_mm
    assert not moe_module._few_rows_per_expert(torch.tensor([65, 1, 1, 1]))  # a busy expert: grouped_mm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_path_equals_the_grouped_one(monkeypatch, torch_experts, dtype):
    moe = moe_layer(TINY_V2).eval().to(dtype)
    x = torch.randn(1, 1, 64, dtype=dtype)  # batch-1 decoding
    one_token = []
    monkeypatch.setattr(moe.experts, "_one_token", _recording(moe.experts._one_token, one_token))
    with torch.no_grad():
        looped, _ = moe(x)
        assert len(one_token) == 1  # it took the one-token path
        grouped, _ = moe(torch.cat([x, torch.zeros_like(x)]))  # two tokens: the grouped path
    assert len(one_token) == 1
    scale = grouped.abs().max().item()  # ×16 routing makes outputs large: bound the error relative to them
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(looped.float(), grouped[:1].float(), atol=tolerance * scale, rtol=tolerance)
    moe(x).__getitem__(0).sum().backward()  # with gradients: the grouped path, which they flow through
    assert len(one_token) == 1 and moe.experts.gate_proj.grad is not None


def test_rows_padded_to_a_granule_keep_each_expert_together():
    ids = torch.tensor([3, 0, 3, 4, 1, 3, 0, 4, 4, 3])  # 4 experts; id 4: another rank's
    rows = moe_module.group_by_expert(ids, moe_module.expert_counts(ids, 4), granule=3)
    assert rows.offsets.tolist() == [2, 3, 3, 9]  # expert 0: 2 rows and 1: 1 row (< 3: as they are), 2: none, 3: 4 → 6
    assert rows.source.numel() == 9 + 3  # then the 3 assignments to no expert here
    starts = [0, 2, 3, 3, 9]
    for slot, e in enumerate(ids.tolist()):  # each assignment sits inside its expert's rows, in order of arrival
        assert starts[e] <= rows.row[slot] < (starts[e + 1] if e < 4 else 12)
        assert rows.source[rows.row[slot]] == slot
    assert rows.row[[1, 6]].tolist() == [0, 1] and rows.row[[0, 2, 5, 9]].tolist() == [3, 4, 5, 6]
    padding = torch.ones(12, dtype=torch.bool)
    padding[rows.row] = False
    assert padding.sum() == 2 and (rows.source[padding] == ids.numel()).all()  # padding rows point past the end
    unpadded = moe_module.group_by_expert(ids, moe_module.expert_counts(ids, 4))
    assert unpadded.offsets.tolist() == [2, 3, 3, 7] and sorted(unpadded.row.tolist()) == list(range(10))


@pytest.mark.parametrize("layout", ["granule", "capacity"])
def test_padded_layouts_equal_the_unpadded_one_forward_and_backward(monkeypatch, layout):
    """The CPU 16-bit layouts (rows padded to ROW_GRANULE, or every expert to the busiest for decoding), run in
    float32 here so that they must agree with the plain grouped layout to rounding, gradients included."""
    moe = moe_layer(TINY_V2).train()
    x = torch.randn(3, 40, 64)

    def run():
        moe.zero_grad()
        xx = x.clone().requires_grad_()
        y, _ = moe(xx)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), xx.grad, moe.experts.gate_proj.grad.clone(), moe.experts.down_proj.grad.clone()

    plain = run()
    monkeypatch.setattr(moe_module, "_cpu_16bit", lambda x, weight: True)
    monkeypatch.setattr(moe_module, "_few_rows_per_expert", lambda counts: layout == "capacity")
    monkeypatch.setattr(moe_module, "ROW_GRANULE", 4)  # the tiny layer's experts get ~10 rows each
    sizes = []
    monkeypatch.setattr(moe_module, "group_by_expert", _recording_rows(moe_module.group_by_expert, sizes))
    padded = run()
    assert sizes[0] > 3 * 40 * moe.top_k  # padding rows were computed
    for got, expected in zip(padded, plain, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _recording_rows(function, sink):
    def wrapper(*args):
        rows = function(*args)
        sink.append(rows.source.numel())
        return rows
    return wrapper


def _recording(function, sink):
    def wrapper(*args):
        sink.append(function(*args))
        return sink[-1]
    return wrapper


def _counting(grouped_linear, sink):
    def wrapper(x, weight, offsets):
        sink.append(int(offsets[-1]))
        return grouped_linear(x, weight, offsets)
    return wrapper


def reference_balance_loss(moe: MoE, x: torch.Tensor, seq_aux: bool) -> torch.Tensor:
    """α·Σ_e f_e·P_e with f_e = count_e / (T·k/E), per sequence then averaged (seq_aux) or over the batch."""
    B, T, _ = x.shape
    E, k, alpha = moe.gate.num_experts, moe.top_k, moe.aux_loss_alpha
    routing = moe.gate(x.view(B * T, -1))
    scores, ids = routing.scores.view(B, T, E), routing.expert_ids.view(B, T, k)
    groups = [(scores[b], ids[b]) for b in range(B)] if seq_aux else [(scores.view(B * T, E), ids.view(B * T, k))]
    losses = []
    for s, i in groups:
        n = s.shape[0]
        f = torch.stack([(i == e).sum() for e in range(E)]).float() / (n * k / E)
        losses.append((f * s.mean(0)).sum())
    return alpha * torch.stack(losses).mean()


@pytest.mark.parametrize("seq_aux", [True, False])
def test_balance_loss_in_training(seq_aux):
    moe = moe_layer(TINY_V2, seq_aux=seq_aux, aux_loss_alpha=0.003).train()
    x = torch.randn(3, 10, 64)
    y, stats = moe(x)
    expected = reference_balance_loss(moe, x, seq_aux)
    torch.testing.assert_close(stats.balance_loss, expected)
    assert stats.balance_loss > 0
    (y.square().mean() + stats.balance_loss).backward()
    assert moe.gate.weight.grad.abs().sum() > 0  # through the combine weights and the balance loss
    assert moe.experts.gate_proj.grad.abs().sum() > 0 and moe.shared_experts.up_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("seq_aux", [True, False])
def test_balance_loss_over_masked_tokens_is_that_of_the_tokens_alone(seq_aux):
    """With ``balance_mask``, the loss is the reference formula over the marked tokens alone: each row's first
    tokens (SFT's rows without their padding), or all of them (the unmasked loss)."""
    moe = moe_layer(TINY_V2, seq_aux=seq_aux, aux_loss_alpha=0.003).train()
    x = torch.randn(2, 10, 64)
    moe.balance_mask = torch.ones(2, 10, dtype=torch.bool)
    torch.testing.assert_close(moe(x)[1].balance_loss, reference_balance_loss(moe, x, seq_aux))
    lengths = [10, 6] if seq_aux else [6, 6]  # the reference takes one T for the whole batch
    moe.balance_mask = torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]  # [2, 10]
    masked = moe(x)[1].balance_loss
    moe.balance_mask = None
    if seq_aux:  # per sequence: the mean of each row's loss over its own tokens
        alone = [reference_balance_loss(moe, x[b:b + 1, :n], seq_aux) for b, n in enumerate(lengths)]
        torch.testing.assert_close(masked, torch.stack(alone).mean())
    else:
        torch.testing.assert_close(masked, reference_balance_loss(moe, x[:, :6].contiguous(), seq_aux))


def test_balance_loss_is_minimal_for_uniform_routing():
    """With identical scores for all experts, f·P sums to exactly 1 per sequence: the loss's floor, α·1."""
    moe = moe_layer(aux_loss_alpha=0.5).train()
    with torch.no_grad():
        moe.gate.weight.zero_()
    _, stats = moe(torch.randn(2, 16, 64))
    assert stats.balance_loss.item() == pytest.approx(0.5)


@pytest.mark.cuda
def test_moe_forward_has_no_host_sync_on_cuda():
    moe = moe_layer(TINY_V2).to("cuda", torch.bfloat16).eval()
    x = torch.randn(4, 33, 64, device="cuda", dtype=torch.bfloat16)
    moe(x)  # warm-up: the one-time grouped_mm capability probe may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1, 4, 6])
def test_slot_sum_without_grad_equals_the_float32_sum_bitwise(dtype, k):
    out = torch.randn(37, k, 64, dtype=dtype)
    before = out.clone()
    with torch.no_grad():
        total = moe_module.sum_over_slots(out)
    assert total.dtype == torch.float32 and total.equal(out.sum(dim=1, dtype=torch.float32))
    assert out.equal(before)  # the first slot is copied, not summed into
    leaf = out.clone().requires_grad_()
    moe_module.sum_over_slots(leaf).sum().backward()  # with gradients: the differentiable sum
    assert leaf.grad.equal(torch.ones_like(leaf))


def test_the_gate_routes_in_float32_under_bf16_autocast():
    """Training's bf16 autocast does not round the router: the experts picked are inference's."""
    gate = randomize_(MoEGate(tiny_config(TINY_V2)), std=0.5)
    x = torch.randn(4096, TINY_V2["hidden_size"], generator=torch.Generator().manual_seed(0))
    plain = gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = gate(x)
    assert autocast.scores.dtype == torch.float32
    assert torch.equal(autocast.expert_ids, plain.expert_ids) and torch.equal(autocast.weights, plain.weights)


def test_compiled_float32_moe_equals_eager():
    """torch.compile traces grouped_mm with fake tensors that take only bf16: float32 takes the per-expert loop."""
    if not moe_module._grouped_mm_works("cpu", torch.float32):
        pytest.skip("no float32 grouped_mm here: the traced path is the eager one")
    from helpers import tiny_model

    model = tiny_model(TINY_V2)
    ids = torch.randint(2, 128, (2, 64))  # with gradients and past the decoding kernel's rows: grouped_linear
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager")  # the fake-tensor tracing is what failed
        assert torch.allclose(compiled(ids), model(ids), atol=1e-5)
    finally:
        torch._dynamo.reset()
