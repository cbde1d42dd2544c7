"""DeepSeekMoE: a softmax gate over fine-grained routed experts, plus always-on shared experts.

Routed experts are stored stacked ([E, ...] per projection) and computed by grouping the token→expert assignments per
expert (a stable sort) and running one grouped matmul per projection: no Python loop over tokens or experts and no
device-to-host synchronization (the fallback for torch builds without ``grouped_mm`` loops over experts).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv2 import kernels
from dsv2.config import ModelConfig
from dsv2.model.hooks import hooked_within
from dsv2.model.linear import Linear, autocast_input, linear, matmul_dtype, small_matmul_applies
from dsv2.model.norm import RMSNorm


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). The dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)  # read by two projections
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def mlp_kernel_applies(mlp: MLP, x: torch.Tensor) -> bool:
    """Whether the decoding kernels compute this SwiGLU for x's rows (`moe_decode`'s shared experts, `decode_layers`'
    dense layers): plain projections without biases (a tensor-parallel down_proj sums over the ranks), weights in
    x's dtype, an intermediate size that is a multiple of 32, and rows small_matmul takes."""
    projections = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return (all(type(p) is Linear and p.bias is None and p.weight.dtype == x.dtype for p in projections)
            and mlp.down_proj.in_features % 32 == 0
            and small_matmul_applies(x.numel() // x.shape[-1], x, mlp.gate_proj.weight))


@dataclass
class Routing:
    scores: torch.Tensor  # [N, E] float32 softmax over all routed experts
    expert_ids: torch.Tensor  # [N, k] chosen experts
    weights: torch.Tensor  # [N, k] float32 combine weights


class MoEGate(nn.Module):
    """Softmax router with greedy or group-limited greedy top-k, as the reference MoEGate."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.n_routed_experts is not None and config.num_experts_per_tok is not None
        self.num_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.topk_method, self.n_group, self.topk_group = config.topk_method, config.n_group, config.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> Routing:
        """x [N, H] → routing of each token to top_k experts."""
        with torch.autocast(x.device.type, enabled=False):  # float32 under bf16 autocast too, as at inference
            logits = F.linear(x.to(torch.float32), self.weight.to(torch.float32))  # [N, E]
            scores = logits.softmax(dim=-1)  # [N, E]
        candidates = scores
        if self.topk_method == "group_limited_greedy":
            N = x.shape[0]
            group_scores = scores.view(N, self.n_group, -1).max(dim=-1).values  # [N, G]: best expert per group
            top_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # [N, topk_group]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)  # [N, G]
            expert_mask = group_mask[:, :, None].expand(N, self.n_group, self.num_experts // self.n_group)
            candidates = scores.masked_fill(~expert_mask.reshape(N, -1), 0.0)  # [N, E]
        weights, expert_ids = candidates.topk(self.top_k, dim=-1, sorted=False)  # [N, k]
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * self.routed_scaling_factor
        return Routing(scores, expert_ids, weights)


@functools.cache
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether F.grouped_mm exists and runs for this device and dtype (it is bf16-only on some CUDA builds)."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        a = torch.zeros(4, 8, dtype=dtype, device=device_type)
        b = torch.zeros(2, 8, 8, dtype=dtype, device=device_type)
        F.grouped_mm(a, b.transpose(-2, -1), offs=torch.tensor([2, 4], dtype=torch.int32, device=device_type))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x [M, in] sorted by expert; rows offsets[e-1]:offsets[e] use weight[e] [out, in]. → [M, out].

    Rows past offsets[-1] belong to no expert here: they are not computed, and their output is undefined.
    Under autocast both operands take the autocast dtype, as a linear layer's would."""
    dtype = matmul_dtype(weight)
    x, weight = x.to(dtype), weight.to(dtype)
    # torch.compile's fake-tensor tracing of grouped_mm takes only bf16 (the eager CPU op takes float32 too)
    traced_off = torch.compiler.is_compiling() and x.dtype != torch.bfloat16
    if not traced_off and _grouped_mm_works(x.device.type, x.dtype):
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()  # host sync: fallback only
    rows = sum(counts)
    chunks = [chunk @ w.T for chunk, w in zip(x[:rows].split(counts), weight, strict=True)]
    return torch.cat([*chunks, x.new_zeros(x.shape[0] - rows, weight.shape[1])])


KERNEL_MAX_ROWS_PER_EXPERT = 32  # average assignments per expert up to which the CPU kernel runs a step's experts
ROW_GRANULE = 32  # rows per expert are padded up to a multiple of this where oneDNN runs the matmuls (see below)


@dataclass
class ExpertRows:
    """n assignments laid out as a row buffer grouped by expert (what grouped_mm takes)."""

    row: torch.Tensor  # [n] the buffer row of each assignment
    source: torch.Tensor  # [rows] the assignment each buffer row holds; n for a padding row
    offsets: torch.Tensor  # [E] int32: expert e's rows end at offsets[e]; rows past offsets[-1] belong to none


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """ids [n] in [0, E] → [E + 1] int32 assignments per expert; the last: ids E (no expert here). No host sync."""
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    return counts.scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))


def group_by_expert(ids: torch.Tensor, counts: torch.Tensor, granule: int = 1,
                    capacity: int | None = None) -> ExpertRows:
    """ids [n] in [0, E] (E: no expert here), counts [E + 1] (`expert_counts`) → their rows, grouped by expert in a
    stable order; an expert's rows padded up to a multiple of ``granule`` when it has at least that many (fewer stay
    as they are: at most granule − 1 shapes, and decoding's few rows are not multiplied), or to exactly ``capacity``
    rows (at least the most any expert has). Assignments to no expert come after offsets[-1]. Unpadded, nothing is
    read back from the device."""
    n, E = ids.numel(), counts.numel() - 1
    order = ids.argsort(stable=True)  # [n]: assignments grouped by expert
    if capacity is not None:
        padded = torch.cat([torch.full_like(counts[:E], capacity), counts[E:]])  # [E + 1]
    elif granule > 1:
        rounded = torch.where(counts[:E] < granule, counts[:E], (counts[:E] + granule - 1) // granule * granule)
        padded = torch.cat([rounded, counts[E:]])
    else:
        padded = counts
    starts = padded.cumsum(0) - padded  # [E + 1] first buffer row of each expert
    sorted_ids = ids[order]  # [n]
    within = torch.arange(n, device=ids.device) - (counts.cumsum(0) - counts)[sorted_ids]  # [n] rank in its expert
    row = torch.empty_like(order).scatter_(0, order, starts[sorted_ids] + within)  # [n]
    size = n if padded is counts else int(padded.sum())  # padded layouts are for the CPU: reading it costs no sync
    source = torch.full((size,), n, dtype=order.dtype, device=ids.device)
    source.scatter_(0, row, torch.arange(n, device=ids.device))  # [rows]
    return ExpertRows(row, source, (starts + padded)[:E].to(torch.int32))


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked: gate_proj/up_proj [E, I, H], down_proj [E, H, I].

    Checkpoints store them one by one (``experts.{e}.gate_proj.weight``); dsv2.weights maps between the two.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.first_expert = 0  # the index of gate_proj[0] among the layer's experts (init_weights' seeds)
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                owned: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, H], expert_ids/weights [N, k] → Σ_k weights·expert(x) [N, H], summed in float32.

        ``owned`` [N, k] (expert parallel): which assignments are to these experts; the others (ids outside
        [0, E), e.g. another rank's) cost nothing and add nothing."""
        N, k = expert_ids.shape
        E = self.num_experts
        x = autocast_input(x)  # before the gather: k rows per token are cast (and their gradients summed) in 16 bits
        if self._kernel_applies(x, N * k):
            ids = expert_ids if owned is None else torch.where(owned, expert_ids, E)
            return kernels.cpu_ops().routed_experts(x, ids, weights, self.gate_proj, self.up_proj, self.down_proj)
        if N == 1 and owned is None and x.device.type == "cpu" and not torch.is_grad_enabled():
            return self._one_token(x, expert_ids[0], weights[0])
        flat_ids = expert_ids.flatten() if owned is None else torch.where(owned, expert_ids, E).flatten()  # [N·k]
        counts = expert_counts(flat_ids, E)  # [E + 1]
        capacity, granule = None, 1
        if _cpu_16bit(x, self.gate_proj):
            if _few_rows_per_expert(counts[:E]):  # decoding: every expert padded to the busiest, three bmm
                capacity = int(counts[:E].max())
            else:  # oneDNN JIT-builds a kernel per matmul shape, and each expert's row count is new at every step
                granule = ROW_GRANULE  # (~5× the matmul's own time): padded counts repeat shapes it has built
        rows = group_by_expert(flat_ids, counts, granule, capacity)
        x_rows = x if rows.source.numel() == N * k else F.pad(x, (0, 0, 0, 1))  # padding rows read the zero row N
        token = rows.source // k  # [rows] each buffer row's token (N·k // k = N for a padding row)
        # index_select is ~5× faster than x[...] on CPU, but its backward (index_add over repeated rows) is not
        # deterministic on CUDA: keep indexing there when training.
        on_cuda_with_grad = torch.is_grad_enabled() and x.device.type != "cpu"
        xs = x_rows[token] if on_cuda_with_grad else x_rows.index_select(0, token)  # [rows, H] grouped by expert
        # Σ_k w·down(h) = Σ_k down(w·h): the combine weights scale the narrower h (padding rows: weight 0)
        row_weight = F.pad(weights.flatten(), (0, 1)).index_select(0, rows.source)[:, None]  # [rows, 1] float32
        if capacity is not None:
            ys = self._batched(xs, row_weight, capacity)
        else:
            offsets = rows.offsets
            h = F.silu(grouped_linear(xs, self.gate_proj, offsets)) * grouped_linear(xs, self.up_proj, offsets)
            ys = grouped_linear(h * row_weight.to(h.dtype), self.down_proj, offsets)  # [rows, H]
        out = ys.index_select(0, rows.row).view(N, k, -1)  # back to (token, slot) order: a gather, not a scatter
        if owned is not None:
            out = torch.where(owned[:, :, None], out, 0)  # rows of no expert here are undefined
        return sum_over_slots(out)  # [N, H] float32

    def _kernel_applies(self, x: torch.Tensor, assignments: int) -> bool:
        """Whether the decoding kernel (`dsv2/kernels`: AMX tiles or AVX-512 in bf16, AVX-512 in float32) computes these
        experts: inference on an AVX-512 CPU, x in the weights' dtype, sizes that are multiples of 32, and
        decode-sized steps (at most KERNEL_MAX_ROWS_PER_EXPERT assignments per expert on average, half that in float32),
        where it beats the torch paths by reading each expert's weights once. Measured on the project's machine, 32
        experts of 1024 → 352, 4 per token, bf16: 2.6× at 1 token, 2.2× at 8, 1.3-1.5× at 64-128, 1.07× at 256;
        float32: 1.7× at 1, 1.5× at 8, 1.3× at 64, 1.1× at 128. Prefills keep grouped_mm."""
        E, inter, H = self.gate_proj.shape
        limit = KERNEL_MAX_ROWS_PER_EXPERT if x.dtype == torch.bfloat16 else KERNEL_MAX_ROWS_PER_EXPERT // 2
        return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32)
                and self.gate_proj.dtype == x.dtype and H % 32 == 0 and inter % 32 == 0
                and assignments <= limit * E and kernels.cpu_ops() is not None)

    def _one_token(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token's k experts one after another (batch-1 decoding on CPU, where reading the ids costs no sync):
        only their weights are touched, with none of the grouping's bookkeeping. x [1, H], ids/weights [k] → [1, H]
        float32."""
        x = x.to(matmul_dtype(self.gate_proj))
        scales = weights.to(x.dtype)  # [k] as the grouped path rounds them
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [1, H]
        for slot, e in enumerate(expert_ids.tolist()):
            h = F.silu(linear(x, self.gate_proj[e])) * linear(x, self.up_proj[e])  # [1, I]
            out += linear(h * scales[slot], self.down_proj[e])
        return out

    def _batched(self, xs: torch.Tensor, row_weight: torch.Tensor, capacity: int) -> torch.Tensor:
        """The experts as three batched matmuls over xs's first E·C rows ([E, C, H], C = capacity), for decoding on
        CPU in 16-bit: there bmm streams the weights 2-3× faster than grouped_mm (measured: 1.2 vs 3.0 ms for
        32 experts × 8 rows of 1024 → 352), and a few padded rows cost nothing. The weights are the left operand
        (W·xᵀ, not x·Wᵀ): 0.7-0.9 vs 0.9-1.5 ms for 32 experts × 4-16 rows. → [rows, H]; rows past E·C (no
        expert here) are zero."""
        E, C = self.num_experts, capacity
        buffer_t = xs[: E * C].view(E, C, -1).transpose(1, 2).to(matmul_dtype(self.gate_proj))  # [E, H, C]
        h_t = F.silu(torch.bmm(self.gate_proj, buffer_t)) * torch.bmm(self.up_proj, buffer_t)  # [E, I, C]
        h_t = h_t * row_weight[: E * C].view(E, 1, C).to(h_t.dtype)
        ys = torch.bmm(self.down_proj, h_t).transpose(1, 2).reshape(E * C, -1)  # [E, H, C] → [E·C, H]
        return F.pad(ys, (0, 0, 0, xs.shape[0] - E * C))


def sum_over_slots(out: torch.Tensor) -> torch.Tensor:
    """out [N, k, H] → Σ_k out [N, H] in float32. Without gradients one float32 accumulator takes the slots one at a
    time: the same adds in the same order as ``sum(dtype=float32)`` (equal bits), which first casts all k slots to a
    float32 copy: 2.4× faster for 4,096 tokens of 16-bit rows, 1.25× for 64 (measured on the project's machine)."""
    if torch.is_grad_enabled() and out.requires_grad:
        return out.sum(dim=1, dtype=torch.float32)
    total = out[:, 0].to(torch.float32, copy=True)  # [N, H]
    for slot in range(1, out.shape[1]):
        total.add_(out[:, slot])
    return total


def _cpu_16bit(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the experts' matmuls run on CPU in 16-bit (oneDNN): there padding pays (bmm beats grouped_mm for
    decoding; rows padded to a granule save kernel builds); in float32 on CPU (MKL), and on GPUs, it does not."""
    return x.device.type == "cpu" and matmul_dtype(weight) in (torch.bfloat16, torch.float16)


def _few_rows_per_expert(counts: torch.Tensor, max_rows: int = 64) -> bool:
    """Decode-sized routing (on CPU, where reading counts costs no sync): at most ``max_rows`` rows per expert and
    at least half the experts in use, so padding to the busiest expert is cheap and every weight read is needed."""
    busiest = int(counts.max())
    return 0 < busiest <= max_rows and 2 * int((counts > 0).sum()) >= counts.numel()


@dataclass
class MoEStats:
    """What a training step needs from one MoE layer."""

    balance_loss: torch.Tensor  # scalar, already multiplied by aux_loss_alpha
    expert_load: torch.Tensor  # [E] float32: tokens routed to each expert


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.n_routed_experts is not None and config.num_experts_per_tok is not None
        self.top_k = config.num_experts_per_tok
        self.aux_loss_alpha, self.seq_aux = config.aux_loss_alpha, config.seq_aux
        self.gate = MoEGate(config)
        self.experts = RoutedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts else None
        )
        # training may add losses computed from the routing (expert-parallel device balance): (routing, B, T) → loss
        self.extra_balance_loss: Callable[[Routing, int, int], torch.Tensor] | None = None
        # [B, T] bool: the tokens the expert-level balance loss counts (None: all; SFT leaves its padding out)
        self.balance_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, with_stats: bool = True) -> tuple[torch.Tensor, MoEStats | None]:
        """x [B, T, H] → y [B, T, H] and this layer's balance loss (training only, else 0) and expert load (None
        unless ``with_stats``: decoding asks for none)."""
        B, T, H = x.shape
        if not with_stats and self.decode_kernel_applies(x):
            return self.decode_step(x), None
        tokens = x.reshape(B * T, H)  # [N, H]
        routing = self.gate(tokens)
        y = self.experts(tokens, routing.expert_ids, routing.weights).to(x.dtype).view(B, T, H)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if not with_stats:
            return y, None
        load = torch.zeros(self.gate.num_experts, dtype=torch.float32, device=x.device)
        load.scatter_add_(0, routing.expert_ids.flatten(), torch.ones(B * T * self.top_k, device=x.device))  # [E]
        loss = torch.zeros((), device=x.device)
        if self.training and self.aux_loss_alpha > 0:
            loss = self.balance_loss(routing, load, B, T)
        if self.training and self.extra_balance_loss is not None:
            loss = loss + self.extra_balance_loss(routing, B, T)
        return y, MoEStats(loss, load)

    def decode_kernel_applies(self, x: torch.Tensor) -> bool:
        """Whether `decode_step` can take these tokens: inference on an AVX-512 CPU, a few tokens in the experts'
        dtype (what `small_matmul` and the routed experts' kernel take), this module's own gate, experts and shared
        experts (not an expert- or tensor-parallel replacement) with no hooks, sizes multiples of 32."""
        experts, shared = self.experts, self.shared_experts
        rows = x.numel() // x.shape[-1]
        return (type(self.gate) is MoEGate and type(experts) is RoutedExperts
                and not any(map(hooked_within, self.children()))
                and self.gate.topk_method in ("greedy", "group_limited_greedy")
                and (shared is None or (type(shared) is MLP and mlp_kernel_applies(shared, x)))
                and small_matmul_applies(rows, x, experts.gate_proj)
                and experts._kernel_applies(x, rows * self.top_k))

    def decode_step(self, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        """The whole layer for a few tokens in one kernel call (`moe_decode`: gate, routed and shared experts, with
        this module's roundings): x [B, T, H] → [B, T, H]. With the decoder layer's ``norm``, x is its residual
        stream h: → h + moe(norm(h))."""
        gate, experts, shared = self.gate, self.experts, self.shared_experts
        out = kernels.cpu_ops().moe_decode(
            x.reshape(-1, x.shape[-1]), gate.weight, *self.routing_args(),
            experts.gate_proj, experts.up_proj, experts.down_proj,
            *((None,) * 3 if shared is None else (shared.gate_proj.weight, shared.up_proj.weight,
                                                  shared.down_proj.weight)),
            None if norm is None else norm.weight, 1e-6 if norm is None else norm.eps)
        return out.view(x.shape)

    def routing_args(self) -> tuple[int, bool, int, int, bool, float]:
        """The gate's routing as the decoding kernels take it: (top_k, group_limited, n_group, topk_group,
        norm_topk_prob, routed_scaling_factor)."""
        gate = self.gate
        return (gate.top_k, gate.topk_method == "group_limited_greedy", gate.n_group or 1, gate.topk_group or 1,
                gate.norm_topk_prob, gate.routed_scaling_factor)

    def balance_loss(self, routing: Routing, load: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """Expert-level balance loss α·Σ_e f_e·P_e, per sequence and averaged (seq_aux) or over the whole batch.

        f_e = (tokens routed to e) / (T·k / E), P_e = mean routing probability of e. With ``balance_mask``, T and
        the means count only the marked tokens, so that padding does not enter the loss.
        """
        E, k = self.gate.num_experts, self.top_k
        if self.balance_mask is not None:
            return self._masked_balance_loss(routing, self.balance_mask, B, T)
        if self.seq_aux:
            ids = routing.expert_ids.view(B, T * k)  # [B, T·k]
            f = torch.zeros(B, E, device=ids.device).scatter_add_(1, ids, torch.ones(B, T * k, device=ids.device))
            f = f / (T * k / E)  # [B, E]
            P = routing.scores.view(B, T, E).mean(dim=1)  # [B, E]
            return (f * P).sum(dim=1).mean() * self.aux_loss_alpha
        f = load / (B * T * k / E)  # [E]
        P = routing.scores.mean(dim=0)  # [E]
        return (f * P).sum() * self.aux_loss_alpha

    def _masked_balance_loss(self, routing: Routing, mask: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """`balance_loss` over the tokens that ``mask`` [B, T] marks."""
        E, k = self.gate.num_experts, self.top_k
        valid = mask.reshape(B, T).to(routing.scores.dtype)  # [B, T]
        per_choice = valid.repeat_interleave(k, dim=1)  # [B, T·k]: expert_ids hold each token's k choices in a row
        ids = routing.expert_ids.view(B, T * k)  # [B, T·k]
        scores = routing.scores.view(B, T, E) * valid[..., None]  # [B, T, E]
        if self.seq_aux:
            n = valid.sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1]: each sequence's counted tokens
            f = torch.zeros(B, E, device=ids.device, dtype=valid.dtype).scatter_add_(1, ids, per_choice)  # [B, E]
            return (f / (n * k / E) * scores.sum(dim=1) / n).sum(dim=1).mean() * self.aux_loss_alpha
        n = valid.sum().clamp(min=1)
        f = torch.zeros(E, device=ids.device, dtype=valid.dtype).scatter_add_(0, ids.flatten(), per_choice.flatten())
        return (f / (n * k / E) * scores.sum(dim=(0, 1)) / n).sum() * self.aux_loss_alpha
