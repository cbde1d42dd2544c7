import pytest
import torch
import torch.nn.functional as F

import dsv2.model.linear as linear_module
from dsv2.model.linear import Linear


@pytest.mark.parametrize("bias", [False, True])
def test_one_bf16_row_goes_through_mv_and_equals_the_matmul(monkeypatch, bias):
    layer = Linear(96, 40, bias=bias).to(torch.bfloat16)
    x = torch.randn(1, 1, 96, dtype=torch.bfloat16)  # [B, T, in]: one decoding token
    calls = []
    mv = torch.mv
    monkeypatch.setattr(linear_module.torch, "mv", lambda *args: calls.append(args) or mv(*args))
    got = layer(x)
    assert calls and got.shape == (1, 1, 40) and got.dtype == torch.bfloat16
    exact = x.double() @ layer.weight.double().T + (layer.bias.double() if bias else 0)
    expected = F.linear(x, layer.weight, layer.bias)
    # both are the exact product rounded to bf16 (the bias added in bf16 as F.linear adds it): same error bound
    tolerance = 2 * exact.abs().max().item() * 2**-8
    torch.testing.assert_close(got.double(), exact, atol=tolerance, rtol=0)
    torch.testing.assert_close(got.double(), expected.double(), atol=tolerance, rtol=0)


@pytest.mark.parametrize("dtype, shape", [(torch.bfloat16, (2, 96)), (torch.float32, (1, 96)),
                                          (torch.float16, (1, 96))], ids=["two-rows", "fp32", "fp16"])
def test_other_inputs_keep_the_ordinary_linear(monkeypatch, dtype, shape):
    layer = Linear(96, 40).to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    monkeypatch.setattr(linear_module.torch, "mv", lambda *a: pytest.fail("mv used"))
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_autocast_keeps_the_ordinary_linear():
    weight, x = torch.randn(40, 96, dtype=torch.bfloat16), torch.randn(1, 96, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not linear_module.single_row_cpu_bf16(x, weight)
    assert linear_module.single_row_cpu_bf16(x, weight)
