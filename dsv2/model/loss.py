"""The output head and cross-entropy in one pass over chunks of tokens, without materializing the logits.

For N tokens the plain way holds several [N, vocab] float32 tensors (logits, log-softmax, their gradient), each 13 GB
for 8 sequences of 4,096 tokens on V2-Lite's 102,400-token vocabulary. Here each chunk of rows computes its
logits, its loss and, because the loss is a weighted sum whose weights are known up front, its gradients at once:
the backward pass only scales them. The matmuls are the same three as the plain head's.
"""

from __future__ import annotations

import torch

from dsv2.model.linear import matmul_dtype

CHUNK_ELEMENTS = 2**23  # logits per chunk (32 MiB in float32)
WEIGHT_GRAD_ELEMENTS = 2**26  # logit gradients kept for one weight-gradient matmul (128 MiB in bf16)
IGNORE_INDEX = -100  # targets to skip, as torch's cross_entropy and transformers' labels


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, target_weights: torch.Tensor,
                compute_dtype: torch.dtype, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        N, V = hidden.shape[0], weight.shape[0]
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)  # [N, H], [V, H]
        valid = targets != IGNORE_INDEX  # [N]
        t = torch.where(valid, targets, 0)  # [N]
        c = torch.where(valid, target_weights.float(), 0.0)  # [N]
        token_loss = torch.zeros(N, dtype=torch.float32, device=hidden.device)  # [N]
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if with_grad else None  # [N, H]
        grad_weight = None  # [V, H] float32
        rows = max(16, CHUNK_ELEMENTS // V)  # rows per chunk of logits
        group_rows = max(rows, WEIGHT_GRAD_ELEMENTS // V)  # rows per weight-gradient matmul
        kept = h.new_empty(min(group_rows, N), V) if with_grad else None  # [g, V] the group's logit gradients
        for group in range(0, N, group_rows):
            group_end = min(group + group_rows, N)
            for start in range(group, group_end, rows):
                chunk = slice(start, min(start + rows, group_end))
                log_probs = torch.log_softmax(h[chunk] @ w.T, dim=-1, dtype=torch.float32)  # [n, V]
                token_loss[chunk] = -log_probs.gather(1, t[chunk, None]).squeeze(1) * valid[chunk]
                if not with_grad:
                    continue
                grad_logits = log_probs.exp_()  # [n, V] softmax
                grad_logits[torch.arange(grad_logits.shape[0], device=t.device), t[chunk]] -= 1.0
                rows_kept = kept[chunk.start - group: chunk.stop - group]  # [n, V] in the compute dtype
                rows_kept.copy_(grad_logits.mul_(c[chunk, None]))  # d(Σ c·loss)/d logits
                grad_hidden[chunk] = rows_kept @ w  # [n, H]
            if with_grad:  # one matmul over the group's rows, not one per chunk (fewer float32 sums of [V, H])
                group_grad = kept[: group_end - group].T @ h[group:group_end]  # [V, H] in the compute dtype
                grad_weight = group_grad.float() if grad_weight is None else grad_weight.add_(group_grad)
        if with_grad and grad_weight is None:  # no tokens
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        loss = (token_loss * c).sum()
        ctx.mark_non_differentiable(token_loss)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss, token_loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_token_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is None:
            raise RuntimeError("linear_cross_entropy ran without gradients: call it with gradients enabled")
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((grad_hidden * grad_loss).to(hidden_dtype), (grad_weight * grad_loss).to(weight_dtype),
                None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         target_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [V, H] (the head), targets [N] (IGNORE_INDEX: skipped) → (Σ target_weights·CE, a
    scalar with gradients; every token's CE [N] float32, detached). ``target_weights`` [N] default to 1 / (the
    number of targets): the mean. Logits are computed in the autocast dtype when autocast is on (as a linear layer's
    would be), softmax and loss in float32."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and head weight {tuple(weight.shape)} do not match")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must have one entry per row of hidden {tuple(hidden.shape)}")
    if target_weights is None:
        target_weights = torch.ones_like(targets, dtype=torch.float32) / (targets != IGNORE_INDEX).sum().clamp(min=1)
    compute_dtype = matmul_dtype(hidden)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets, target_weights, compute_dtype, with_grad)

