"""Evaluation as a user meets it: answers right but written differently, --limit and --tasks values that must be
refused before the model loads, and the releases' CSV files as an editor may save them (with a byte-order mark)."""

import shutil
from pathlib import Path

import pytest

from dsv2.eval import scoring
from dsv2.eval.runner import evaluate
from dsv2.eval.tasks import BENCHMARKS, check_tasks

DATA = Path(__file__).parent / "fixtures" / "eval"


@pytest.mark.parametrize(("predicted", "reference", "equal"), [
    # a fraction and its decimal, a negative fraction in any of its spellings, an unreduced fraction
    ("0.75", "\\frac{3}{4}", True), ("-1/2", "-\\frac{1}{2}", True), ("-0.5", "-\\frac{1}{2}", True),
    ("\\frac{-1}{2}", "-\\frac12", True), ("\\frac{6}{8}", "\\frac34", True), ("\u2212\\frac{1}{2}", "-\\frac12", True),
    # but not a rounded decimal, another fraction, the opposite sign, or a division by zero
    ("0.333333", "\\frac13", False), ("\\frac{1}{3}", "\\frac12", False), ("\\frac{1}{2}", "-\\frac12", False),
    ("\\frac{1}{0}", "\\frac{2}{0}", False),
])
def test_math_fractions_compare_by_value(predicted, reference, equal):
    assert scoring.math_equal(predicted, reference) is equal


def test_a_unicode_minus_is_a_minus_in_gsm8k():
    assert scoring.extract_number("So she is short by \u22125. The answer is \u22125.") == "-5"
    assert not scoring.numbers_equal(scoring.extract_number("The answer is \u22125."), "5")


@pytest.mark.parametrize(("completion", "reference", "correct"), [
    ("So the answer is A.", "(A)", True), ("So the answer is: (A).", "(A)", True),
    ("So the answer is **(A)**.", "(A)", True), ("So the answer is (A) Paris.", "(A)", True),
    ("So the answer is **True**.", "True", True),
    ("So the answer is A man.", "(A)", False), ("So the answer is B.", "(A)", False),
    ("So the answer is (B) Paris.", "(A)", False), ("So the answer is valid.", "invalid", False),
])
def test_bbh_multiple_choice_answers_written_differently(completion, reference, correct):
    assert BENCHMARKS["bbh"].check(completion, reference)[1] is correct


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_under_one_is_refused_not_read_as_every_question_or_all_but_the_last(limit, tmp_path, monkeypatch):
    import dsv2.eval.runner as runner

    def no_model(**kwargs):
        raise AssertionError("the model was loaded before --limit was checked")

    monkeypatch.setattr(runner, "LLM", no_model)
    with pytest.raises(ValueError, match=f"--limit {limit} is not allowed: .*at least 1"):
        evaluate(None, ["mmlu"], DATA, tmp_path / "out", limit=limit)
    with pytest.raises(ValueError, match=f"--limit {limit} is not allowed"):
        BENCHMARKS["mmlu"].load(DATA, limit)
    assert len(BENCHMARKS["mmlu"].load(DATA, 1)) == 1 and len(BENCHMARKS["mmlu"].load(DATA, None)) == 4


def test_no_task_or_a_task_named_twice_is_refused():
    with pytest.raises(ValueError, match="no task selected"):
        check_tasks([])
    with pytest.raises(ValueError, match="mmlu named more than once"):
        check_tasks(["mmlu", "gsm8k", "mmlu"])
    check_tasks(["mmlu", "gsm8k"], limit=3)


def test_csv_files_with_a_byte_order_mark_load(tmp_path):
    shutil.copytree(DATA, tmp_path / "data")
    for name, relative in (("ceval", "ceval/val/physics_val.csv"), ("mmlu", "mmlu/test/astronomy_test.csv")):
        path = tmp_path / "data" / relative
        text = path.read_text(encoding="utf-8")
        if name == "ceval":  # the id column dropped: the header starts with the question column
            text = "\n".join(line.split(",", 1)[1] for line in text.splitlines()) + "\n"
        path.write_text("\ufeff" + text, encoding="utf-8")
        items = BENCHMARKS[name].load(tmp_path / "data", None)
        assert items and "\ufeff" not in items[0].prompt, name


def test_lm_eval_with_its_chat_template_option_prompts_through_the_checkpoints_chat_format(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from dsv2.eval.lm_eval import DSV2LM

    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "Is the sky blue?", "answer": "yes"}\n')
    (tmp_path / "dsv2_chat_gen.yaml").write_text(f"""
task: dsv2_chat_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
""")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    prompts = []
    generate = DSV2LM.generate_until
    monkeypatch.setattr(DSV2LM, "generate_until",
                        lambda self, requests, *a, **k: prompts.extend(r.args[0] for r in requests)
                        or generate(self, requests, *a, **k))
    out = lm_eval.simple_evaluate(model="dsv2", model_args="kv_cache_memory=8000000", tasks=["dsv2_chat_gen"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), apply_chat_template=True)
    assert "exact_match,none" in out["results"]["dsv2_chat_gen"]
    assert prompts == ["<｜begin▁of▁sentence｜>User: Question: Is the sky blue?\n\nAssistant:"]
