import pytest
import torch

from dsv2 import SamplingParams
from dsv2.sampling import SamplingRow, biased, filtered_probs, penalized, sample, top_logprobs

V = 8


def rows(*params):
    return [SamplingRow.start(p, [0]) for p in params]


def draws(logits, params, n=2000):
    return sample(logits.expand(n, V).clone(), rows(*[params] * n))


def test_greedy_is_argmax():
    logits = torch.randn(5, V)
    assert torch.equal(sample(logits, rows(*[SamplingParams(temperature=0)] * 5)), logits.argmax(-1))


def test_temperature_one_follows_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -1.0, -2.0, -3.0])
    tokens = draws(logits, SamplingParams(temperature=1.0), n=20000)
    freq = torch.bincount(tokens, minlength=V).float() / 20000
    assert (freq - logits.softmax(-1)).abs().max() < 0.015


def test_top_k_top_p_and_min_p_never_pick_outside_the_allowed_set():
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0])  # probs ≈ .46 .28 .17 .06 .02 ...
    assert set(draws(logits, SamplingParams(top_k=3)).tolist()) == {0, 1, 2}
    assert set(draws(logits, SamplingParams(top_p=0.7)).tolist()) == {0, 1}  # .46 < .7 ≤ .46 + .28
    assert set(draws(logits, SamplingParams(min_p=0.3)).tolist()) == {0, 1, 2}  # p ≥ .3 × .46
    assert set(draws(logits, SamplingParams(top_p=0.01)).tolist()) == {0}  # the best token always stays
    assert set(draws(logits, SamplingParams(top_k=3, top_p=0.55, temperature=2.0)).tolist()) <= {0, 1, 2}


def test_rows_without_filters_skip_the_sort_with_the_same_probabilities(monkeypatch):
    logits = torch.randn(4, V)
    plain = rows(SamplingParams(), SamplingParams(temperature=0.5), SamplingParams(top_k=V), SamplingParams(top_k=-1))
    sorted_path = filtered_probs(torch.cat([logits, logits[:1]]), plain + rows(SamplingParams(top_k=2)))[:4]
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "sort", lambda *a, **k: pytest.fail("sorted although no row filters"))
        fast = filtered_probs(logits, plain)  # a plain softmax
    assert torch.equal(fast, logits.softmax(-1))
    torch.testing.assert_close(fast, sorted_path, rtol=0, atol=1e-7)


def test_top_p_one_keeps_the_whole_tail_in_a_batch_that_sorts():
    logits = torch.cat([torch.tensor([30.0]), torch.full((V - 1,), -30.0)])[None].expand(2, V)  # a near-certain token
    probs = filtered_probs(logits, rows(SamplingParams(top_p=1.0), SamplingParams(top_k=3)))
    assert (probs[0] > 0).all()  # float32 cumulative sums reach 1 after the first token: nothing may be dropped


def test_seeded_rows_repeat_and_do_not_depend_on_the_batch():
    logits = torch.randn(1, V)
    alone = [sample(logits, rows(SamplingParams(seed=7))).item() for _ in range(3)]
    assert len(set(alone)) == 1
    batch = rows(SamplingParams(seed=7), SamplingParams(seed=8), SamplingParams())
    solo = rows(SamplingParams(seed=7))
    first = []
    for _ in range(20):
        first.append(sample(logits.expand(3, V).clone(), batch)[0].item())
        assert first[-1] == sample(logits, solo).item()
    assert len(set(first)) > 1  # a stream of draws, not one value repeated


def test_penalties():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    row = SamplingRow(params, prompt_ids=[0, 1], output_ids=[2, 2])
    out = penalized(logits.clone(), [row, SamplingRow(SamplingParams(), [0, 1], [2, 2])])[0]
    assert torch.equal(penalized(logits.clone(), [SamplingRow(SamplingParams(), [0], [2])]), logits)
    # prompt tokens 0 and 1: repetition only (2.0 / 2, -1.0 × 2); output token 2 (twice): all three
    assert out[:3].tolist() == pytest.approx([1.0, -2.0, 0.25 - 0.5 - 0.5])
    assert out[3:].tolist() == logits[0, 3:].tolist()


def test_logit_bias_is_added_per_row_before_the_penalties():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0]] * 3)
    forced, banned = SamplingParams(temperature=0, logit_bias={3: 100}), SamplingParams(temperature=0,
                                                                                        logit_bias={0: -100})
    assert sample(logits.clone(), rows(forced, banned, SamplingParams(temperature=0))).tolist() == [3, 4, 0]
    assert (draws(logits[0], SamplingParams(temperature=1.0, logit_bias={1: 100.0}), n=200) == 1).all()
    row = SamplingRow(SamplingParams(repetition_penalty=4.0, logit_bias={1: 3.0}), prompt_ids=[1])
    assert penalized(biased(logits[:1], [row]), [row])[0, 1].item() == 0.5  # (-1 + 3) / 4, not -1 × 4 + 3
    with pytest.raises(ValueError, match=r"SamplingParams\.logit_bias"):
        SamplingParams(logit_bias={5: 101})


def test_logprobs_are_the_model_distribution():
    logits = torch.randn(3, V)
    chosen, ids, values = top_logprobs(logits, torch.tensor([0, 5, 7]), k=2)
    expected = logits.log_softmax(-1)
    assert torch.allclose(chosen, expected[[0, 1, 2], [0, 5, 7]])
    assert torch.equal(ids, expected.topk(2).indices) and torch.allclose(values, expected.topk(2).values)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"), ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"stop": [""]}, "stop"), ({"repetition_penalty": 0}, "repetition"),
])
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)
