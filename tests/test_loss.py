import copy

import pytest
import torch
import torch.nn.functional as F

import dsv2.model.loss as loss_module
from dsv2 import DeepseekV2ForCausalLM
from dsv2.model.loss import linear_cross_entropy

from helpers import TINY_LITE, randomize_, tiny_config


def plain(hidden, weight, targets, target_weights):
    """The oracle: full logits, torch's cross_entropy, a weighted sum."""
    ce = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none", ignore_index=-100)
    return (ce * target_weights).sum(), ce


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("group_rows", [16, 32, 64], ids=["a-group-per-chunk", "two-groups", "one-group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_full_logits_cross_entropy_with_gradients(monkeypatch, dtype, group_rows):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 16 * 50)  # 16 rows per chunk: 3 chunks and a partial one
    monkeypatch.setattr(loss_module, "WEIGHT_GRAD_ELEMENTS", group_rows * 50)  # rows per weight-gradient matmul
    torch.manual_seed(0)
    hidden, weight = torch.randn(53, 24), torch.randn(50, 24) * 0.3
    targets = torch.randint(0, 50, (53,))
    targets[[3, 40]] = -100  # no target at these positions
    target_weights = torch.rand(53)
    results = []
    for fn in (plain, linear_cross_entropy):
        h, w = leaves(hidden, weight)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss, ce = fn(h, w, targets, target_weights)
        (loss * 3.0).backward()  # the backward scales by the incoming gradient
        results.append((loss.detach(), ce.detach(), h.grad, w.grad))
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, **tol)
    assert results[1][1][3] == 0 and results[1][3].dtype == torch.float32  # skipped target; master-weight grads


def test_default_weights_give_the_mean_and_no_grad_skips_the_gradients():
    hidden, weight, targets = torch.randn(10, 8), torch.randn(30, 8), torch.randint(0, 30, (10,))
    targets[0] = -100
    loss, _ = linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100))
    h, w = leaves(hidden, weight)
    with torch.no_grad():
        loss, _ = linear_cross_entropy(h, w, targets)
    assert not loss.requires_grad
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:5])


def test_model_loss_equals_the_loss_of_its_logits():
    model = randomize_(DeepseekV2ForCausalLM.from_config(tiny_config(TINY_LITE)), std=0.1).train()
    twin = copy.deepcopy(model)
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    mask = torch.rand(2, 11) > 0.3
    weights = mask / mask.sum()
    out = model(x[:, :-1], targets=x[:, 1:], target_weights=weights)
    assert out.logits is None
    (out.loss + out.aux_loss).backward()
    ref = twin(x[:, :-1], return_aux=True)
    ce = F.cross_entropy(ref.logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
    ((ce * weights.flatten()).sum() + ref.aux_loss).backward()
    torch.testing.assert_close(out.loss, (ce * weights.flatten()).sum())
    torch.testing.assert_close(out.token_loss, ce.view(2, 11).detach())
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_no_tokens_give_a_zero_loss_and_zero_gradients():
    hidden, weight = leaves(torch.randn(0, 8), torch.randn(30, 8))
    targets = torch.zeros(0, dtype=torch.long)
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, targets)[0] == 0
    loss, token_loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert loss == 0 and token_loss.shape == (0,) and torch.equal(weight.grad, torch.zeros_like(weight))
