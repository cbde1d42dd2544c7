"""Forward hooks that a fused call would pass by.

The decoding kernels compute whole modules (a decoder layer's attention or MoE half, every layer of a step) without
calling them, and a replayed CUDA graph runs none of the model's Python: a forward hook (or pre-hook) registered on
such a module, or on anything inside it, would not run. Each fused path asks these first and leaves hooked modules to
their own forward.
"""

from __future__ import annotations

from torch import nn


def hooked(module: nn.Module) -> bool:
    """Whether forward hooks (or pre-hooks) are registered on ``module`` itself."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def hooked_within(module: nn.Module) -> bool:
    """Whether ``module`` or any module inside it has forward hooks (or pre-hooks)."""
    return any(map(hooked, module.modules()))


def hook_tables(modules: list[nn.Module]) -> list[dict]:
    """The hook tables of ``modules`` (torch fills them in place): ``any(tables)`` then says whether any of them is
    hooked, ~10× faster than asking each module (1.6 vs 14 µs for the 132 modules of the benchmark's model)."""
    return [table for module in modules for table in (module._forward_hooks, module._forward_pre_hooks)]
