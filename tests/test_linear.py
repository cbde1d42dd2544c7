import pytest
import torch
import torch.nn.functional as F

import dsv2.model.linear as linear_module
from dsv2.model.linear import SMALL_MATMUL_MAX_ROWS, Linear

from helpers import greedy_continuation, tiny_model


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


needs_prepacking = pytest.mark.skipif(not linear_module._onednn_prepacking_works(),
                                      reason="this torch build has no oneDNN prepacked linear")


@needs_prepacking
@pytest.mark.parametrize("rows", [SMALL_MATMUL_MAX_ROWS[torch.bfloat16] + 1, 64, 300])  # more than small_matmul takes
@pytest.mark.parametrize("bias", [False, True])
def test_several_bf16_rows_without_grad_read_the_prepacked_weight_bitwise(rows, bias):
    layer = Linear(96, 40, bias=bias).to(torch.bfloat16)
    x = torch.randn(96, rows, dtype=torch.bfloat16).T.view(1, rows, 96)  # [B, T, in], not contiguous
    with torch.no_grad():
        got = layer(x)
        packed = linear_module._prepacked.get(layer.weight)
        assert packed is not None  # the packed copy was made and is kept for the next call
        assert layer(x).equal(got) and linear_module._prepacked.get(layer.weight)[1] is packed[1]
    assert got.shape == (1, rows, 40)
    if not bias:
        assert got.equal(F.linear(x, layer.weight))
    else:  # oneDNN adds the bias inside the product (one rounding), F.linear after it in bf16 (two): same bound
        exact = x.double() @ layer.weight.double().T + layer.bias.double()
        torch.testing.assert_close(got.double(), exact, atol=2 * exact.abs().max().item() * 2**-8, rtol=0)


@needs_prepacking
def test_prepacked_weight_follows_in_place_changes_and_dies_with_the_layer():
    layer = Linear(96, 40, bias=False).to(torch.bfloat16)
    x = torch.randn(SMALL_MATMUL_MAX_ROWS[torch.bfloat16] + 1, 96, dtype=torch.bfloat16)  # past small_matmul's rows
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(-2)  # e.g. load_state_dict's copy_: the version changes, the pointer does not
        after = layer(x)
    assert after.equal(F.linear(x, layer.weight)) and not after.equal(before)
    count = len(linear_module._prepacked)
    del layer
    assert len(linear_module._prepacked) == count - 1


@needs_prepacking
def test_grad_autocast_and_float32_never_prepack():
    layer = Linear(96, 40).to(torch.bfloat16)
    x = torch.randn(8, 96, dtype=torch.bfloat16)
    out = layer(x)  # gradients on: the ordinary differentiable linear
    assert out.grad_fn is not None and layer.weight not in linear_module._prepacked
    fp32 = Linear(96, 40)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fp32(torch.randn(8, 96))
    with torch.no_grad():
        fp32(torch.randn(8, 96))
    assert fp32.weight not in linear_module._prepacked


def test_a_model_made_under_inference_mode_decodes_as_one_made_normally():
    """Its weights are inference tensors, which keep no version counter for the weight caches (prepacked copies,
    the absorbed W_UK / W_UV) to read: they must still work, and give the same tokens."""
    prompt = torch.randint(0, 100, (2, 7))
    expected = greedy_continuation(tiny_model(dtype=torch.bfloat16), prompt, 5)
    with torch.inference_mode():
        model = tiny_model(dtype=torch.bfloat16)
        assert model.lm_head.weight.is_inference()
        assert greedy_continuation(model, prompt, 5).equal(expected)
