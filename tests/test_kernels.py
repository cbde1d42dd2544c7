"""The native CPU kernels (dsv2/kernels) against dsv2's torch paths, which are tested against the references."""

import pytest
import torch

from dsv2 import kernels
from dsv2.model.moe import RoutedExperts

from helpers import randomize_

amx = pytest.mark.skipif(kernels.amx_ops() is None, reason="needs an x86-64 Linux CPU with AMX and a C++ compiler")


def experts(E: int, H: int, inter: int) -> RoutedExperts:
    return randomize_(RoutedExperts(E, H, inter), std=0.1).to(torch.bfloat16)


def routed(module: RoutedExperts, x, ids, weights, owned=None, *, torch_path: bool = False) -> torch.Tensor:
    """The module's inference output: through the AMX kernel, or with it switched off (its torch paths)."""
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        if torch_path:
            patch.setattr(kernels, "amx_ops", lambda: None)
        return module(x, ids, weights, owned)


@amx
@pytest.mark.parametrize(("N", "E", "k", "H", "inter"), [
    (1, 8, 2, 64, 32),  # one token (the torch path: one expert after another)
    (5, 8, 3, 128, 96),  # a few tokens (the torch path: grouped_mm)
    (64, 16, 4, 256, 128),  # a decode batch (the torch path: capacity bmm)
    (40, 4, 2, 64, 64),  # 20 assignments per expert on average: experts with 2 and 3 groups of 16 tokens
])
def test_amx_routed_experts_equal_the_torch_paths(N, E, k, H, inter):
    torch.manual_seed(N)
    module = experts(E, H, inter)
    x = torch.randn(N, H, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(N)])  # [N, k] distinct per token
    weights = torch.rand(N, k)
    assert module._amx_applies(x, N * k) is False  # gradients are enabled out here: training never takes it
    with torch.no_grad():
        assert module._amx_applies(x, N * k)
    got = routed(module, x, ids, weights)
    ref = routed(module, x, ids, weights, torch_path=True)
    assert got.dtype == torch.float32 and got.shape == (N, H)
    # the same bf16 roundings as the torch path; only the order of the float32 sums inside a product may differ
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@amx
def test_amx_assignments_to_other_ranks_experts_add_nothing():
    module = experts(8, 64, 32)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 9], [3, 12], [8, 1], [7, 7 + 8], [2, 5], [15, 14]])  # ids ≥ 8: another rank's
    owned = ids < 8
    weights = torch.rand(6, 2)
    got = routed(module, x, ids, weights, owned)
    ref = routed(module, x, ids, weights, owned, torch_path=True)
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    assert (got[5] == 0).all()  # both of its experts live elsewhere


@amx
def test_amx_kernel_is_kept_out_of_what_it_does_not_cover():
    module = experts(8, 64, 32)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert module._amx_applies(x, 8)
        assert not module._amx_applies(x, 8 * 32 + 1)  # prefill-sized: grouped_mm
        assert not module._amx_applies(x.float(), 8)  # float32 input
        assert not module.float()._amx_applies(x, 8)  # float32 weights
        assert not experts(8, 64, 48)._amx_applies(x, 8)  # intermediate size not a multiple of 32
    with pytest.raises(RuntimeError, match="bfloat16 CPU tensors"):
        kernels.amx_ops().routed_experts(x.float(), torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1),
                                         module.gate_proj.float(), module.up_proj.float(), module.down_proj.float())
    with pytest.raises(RuntimeError, match="multiples of 32"):
        m = experts(8, 64, 48)
        kernels.amx_ops().routed_experts(x, torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1),
                                         m.gate_proj, m.up_proj, m.down_proj)


def test_kernels_switch_off_by_environment(monkeypatch):
    assert kernels.kernels_enabled()
    monkeypatch.setenv("DSV2_CPU_KERNELS", "0")
    assert not kernels.kernels_enabled()
    assert kernels.amx_ops.__wrapped__() is None  # uncached: asked again, it declines before building anything
