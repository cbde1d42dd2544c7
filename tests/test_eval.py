"""Evaluation: the benchmark file formats, answer checking, the code sandbox, scripted models, the real engine, and
the lm-evaluation-harness adapter."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from dsv2 import LLM, DeepseekV2ForCausalLM, Tokenizer
from dsv2.eval import scoring
from dsv2.eval.runner import EngineBackend, Evaluator, evaluate, write_results
from dsv2.eval.sandbox import run_program
from dsv2.eval.tasks import BENCHMARKS, MalformedData, MissingData

from helpers import make_tokenizer_files, tiny_checkpoint

DATA = Path(__file__).parent / "fixtures" / "eval"
COUNTS = {"mmlu": 4, "ceval": 2, "cmmlu": 3, "bbh": 3, "gsm8k": 3, "math": 2, "humaneval": 2, "mbpp": 2}


def test_every_format_loads():
    for name, benchmark in BENCHMARKS.items():
        items = benchmark.load(DATA, None)
        assert len(items) == COUNTS[name], name
    mmlu = BENCHMARKS["mmlu"].load(DATA, None)[0]
    assert mmlu.prompt.startswith("The following are multiple choice questions (with answers) about astronomy.")
    assert mmlu.prompt.count("Answer:") == 6 and mmlu.prompt.endswith("Answer:") and mmlu.reference == "A"
    assert BENCHMARKS["gsm8k"].load(DATA, None)[2].reference == "2400"
    assert BENCHMARKS["gsm8k"].load(DATA, None)[0].prompt.count("The answer is") == 8  # 8-shot chain of thought
    assert BENCHMARKS["math"].load(DATA, None)[0].reference == "\\frac{3}{4}"
    assert BENCHMARKS["mbpp"].load(DATA, None)[0].prompt.count("[BEGIN]") == 4  # 3 examples + the task
    assert BENCHMARKS["bbh"].load(DATA, 2)[1].prompt.endswith("A: Let's think step by step.")


def test_missing_files_name_the_layout(tmp_path):
    with pytest.raises(MissingData, match=r"mmlu is missing: expected mmlu/dev/<subject>_dev\.csv"):
        BENCHMARKS["mmlu"].load(tmp_path, None)
    (tmp_path / "gsm8k").mkdir()
    with pytest.raises(MissingData, match=r"gsm8k/train\.jsonl is missing"):
        BENCHMARKS["gsm8k"].load(tmp_path, None)


def test_shots_change_the_prompts_and_bad_counts_are_named():
    five = BENCHMARKS["mmlu"].load(DATA, 1, None)[0].prompt
    assert BENCHMARKS["mmlu"].load(DATA, 1, 5)[0].prompt == five and five.count("Answer: ") == 5
    assert BENCHMARKS["mmlu"].load(DATA, 1, 2)[0].prompt.count("Answer: ") == 2
    assert BENCHMARKS["mmlu"].load(DATA, 1, 0)[0].prompt.count("Answer: ") == 0
    assert BENCHMARKS["gsm8k"].load(DATA, 1, 1)[0].prompt.count("Question: ") == 2  # one example + the question
    assert BENCHMARKS["mbpp"].load(DATA, 1, 0)[0].prompt.count("[BEGIN]") == 1  # the task alone
    with pytest.raises(ValueError, match=r"humaneval: --shots 2 is not allowed \(allowed: 0 only; the protocol uses 0"):
        BENCHMARKS["humaneval"].load(DATA, 1, 2)
    with pytest.raises(ValueError, match="bbh: --shots 2"):
        BENCHMARKS["bbh"].load(DATA, 1, 2)


def test_a_shot_count_some_task_refuses_is_named_for_every_such_task_before_any_runs(tmp_path, monkeypatch):
    import dsv2.eval.runner as runner

    def no_model(**kwargs):
        raise AssertionError("the model was loaded before the shot counts were checked")

    monkeypatch.setattr(runner, "LLM", no_model)
    with pytest.raises(ValueError) as refused:
        evaluate(None, list(BENCHMARKS), DATA, tmp_path / "out", shots=1)
    message = str(refused.value)
    assert message.startswith("--shots 1 is not allowed by bbh (allowed: 0 or 3), humaneval (allowed: 0 only); ")
    assert "--tasks (here: mmlu,ceval,cmmlu,mbpp,gsm8k,math)" in message and "leave --shots out" in message
    with pytest.raises(ValueError, match=r"by mmlu \(allowed: 0–5\), bbh \(allowed: 0 or 3\), ceval \(allowed: "
                                         r"0–5\), cmmlu \(allowed: 0–5\), humaneval \(allowed: 0 only\), mbpp "
                                         r"\(allowed: 0–3\); select tasks that allow it with --tasks \(here: "
                                         r"gsm8k,math\)"):
        evaluate(None, list(BENCHMARKS), DATA, tmp_path / "out", shots=6)
    with pytest.raises(ValueError, match=r"--shots 9 is not allowed by gsm8k \(allowed: 0–8\); no task allows it"):
        evaluate(None, ["gsm8k"], DATA, tmp_path / "out", shots=9)
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(None, ["gsm8k", "nope"], DATA, tmp_path / "out", shots=0)
    assert not (tmp_path / "out").exists()
    for name, benchmark in BENCHMARKS.items():  # the loaders allow exactly what the check allows
        for shots in range(-1, 10):
            if shots in benchmark.allowed_shots:
                assert benchmark.load(DATA, 1, shots), (name, shots)
            else:
                with pytest.raises(ValueError, match=f"{name}: --shots {shots} is not allowed"):
                    benchmark.load(DATA, 1, shots)


def test_malformed_files_name_the_file_and_the_format(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text('{"question": "q", "answer": "no final number"}\n')
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(MalformedData, match=r"gsm8k/train\.jsonl: not in the release's format"):
        BENCHMARKS["gsm8k"].load(tmp_path, None, None)
    (tmp_path / "gsm8k" / "train.jsonl").write_text("{not json\n")
    with pytest.raises(MalformedData, match="one JSON object per line"):
        BENCHMARKS["gsm8k"].load(tmp_path, None, None)
    for split in ("dev", "test"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
    (tmp_path / "mmlu" / "dev" / "x_dev.csv").write_text("q,a,b,c,d,A\n" * 5)
    (tmp_path / "mmlu" / "test" / "x_test.csv").write_text("q,a,b\n")
    with pytest.raises(MalformedData, match=r"x_test\.csv: a row with fewer than 6 cells"):
        BENCHMARKS["mmlu"].load(tmp_path, None, None)
    (tmp_path / "humaneval").mkdir()
    (tmp_path / "humaneval" / "HumanEval.jsonl").write_text('{"task_id": "t", "prompt": "p", "test": "x"}\n')
    with pytest.raises(MalformedData, match="lacks entry_point"):
        BENCHMARKS["humaneval"].load(tmp_path, None, None)


def _edit(root: Path, relative: str, text: str | bytes, append: bool = False) -> None:
    path = root / relative
    if append:
        text = path.read_text(encoding="utf-8") + text
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))


MBPP_TASK = '{"task_id": 11, "text": "t", "code": "c", "test_list": %s}\n'


@pytest.mark.parametrize(("task", "relative", "text", "append", "message"), [
    ("gsm8k", "gsm8k/test.jsonl", '{"question": "x", "answer": 5}\n', False,
     r"gsm8k/test\.jsonl: not in the release's format at line 1: 'answer' is int 5, not a string"),
    ("gsm8k", "gsm8k/test.jsonl", '{"question": "x", "answer": "5"}\n', False,
     r"gsm8k/test\.jsonl: not in the release's format at line 1: the answer str '5' does not end in one \"####"),
    ("gsm8k", "gsm8k/test.jsonl", "[1, 2]\n", False, r"test\.jsonl: .*line 1: a JSON list, not an object"),
    ("ceval", "ceval/val/physics_val.csv", "id,question,A,B,C,D,answer\n0,q,a,b\n", False,
     r"physics_val\.csv: a row with fewer than 6 cells at line 2"),
    ("ceval", "ceval/val/physics_val.csv", "id,question,A,B,C,answer\n0,q,a,b,c,A\n", False,
     r"physics_val\.csv: .*header: no column D"),
    ("mmlu", "mmlu/test/astronomy_test.csv", "q,a,b,c,d,E\n", False,
     r"astronomy_test\.csv: not in the release's format at line 1: the answer is 'E'"),
    ("cmmlu", "cmmlu/test/agronomy.csv", "Question,A,B,C,D,Answer\nq,a,b,c,d,X\n", False,
     r"agronomy\.csv: not in the release's format at line 2: the answer is 'X'"),
    ("bbh", "bbh/cot-prompts/boolean_expressions.txt", b"\xff\xfe", False,
     r"cot-prompts/boolean_expressions\.txt: not in the release's format, expected UTF-8 text"),
    ("bbh", "bbh/bbh/boolean_expressions.json", '{"examples": [{"input": "1+1", "target": 2}]}', False,
     r"boolean_expressions\.json: not in the release's format at example 0: 'target' is int 2, not a string"),
    ("bbh", "bbh/bbh/boolean_expressions.json", '{"x": []}', False, r"boolean_expressions\.json: .*\"examples\" list"),
    ("math", "math/test/prealgebra/1.json", "[1]", False, r"1\.json: .*a JSON list, not an object"),
    ("humaneval", "humaneval/HumanEval.jsonl", '{"task_id": "a", "prompt": "p", "test": 1, "entry_point": "f"}\n',
     False, r"HumanEval\.jsonl: .*line 1: 'test' is int 1, not a string"),
    ("mbpp", "mbpp/mbpp.jsonl", MBPP_TASK.replace("11", '"12"') % '["assert f() == 1"]', True,
     r"mbpp\.jsonl: not in the release's format at line \d+: 'task_id' is str '12', not an integer"),
    ("mbpp", "mbpp/mbpp.jsonl", MBPP_TASK % '"assert f() == 1"', True,
     r"mbpp\.jsonl: .*'test_list' is str 'assert f\(\) == 1', not a list"),
    ("mbpp", "mbpp/mbpp.jsonl", MBPP_TASK % "[]", True, r"mbpp\.jsonl: .*'test_list' is list \[\], not a list of test"),
])
def test_records_of_the_wrong_shape_are_refused_at_load_naming_the_file_and_record(tmp_path, task, relative, text,
                                                                                    append, message):
    """Wrong types, short rows, answers outside A–D or without "####", undecodable text: a MalformedData that names
    the file (and the line or record) when the task loads, not a traceback, nor a crash after the model answered."""
    shutil.copytree(DATA, tmp_path / "data")
    _edit(tmp_path / "data", relative, text, append)
    with pytest.raises(MalformedData, match=message):
        BENCHMARKS[task].load(tmp_path / "data", None, None)


def test_a_humaneval_gz_that_is_not_gzip_names_the_file(tmp_path):
    shutil.copytree(DATA, tmp_path / "data")
    (tmp_path / "data" / "humaneval" / "HumanEval.jsonl").unlink()
    (tmp_path / "data" / "humaneval" / "HumanEval.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(MalformedData, match=r"HumanEval\.jsonl\.gz: not in the release's format.*BadGzipFile"):
        BENCHMARKS["humaneval"].load(tmp_path / "data", None, None)


@pytest.mark.parametrize(("completion", "expected"), [
    ("He has 3 + 4 = 7 apples. The answer is 7.", "7"), ("So 1,200 * 2 = 2,400. The answer is $2,400.", "2400"),
    ("First 5, then 12 and finally 13", "13"), ("no digits here", None), ("The final answer is -3.5", "-3.5"),
])
def test_gsm8k_extraction(completion, expected):
    assert scoring.extract_number(completion) == expected


@pytest.mark.parametrize(("predicted", "reference", "equal"), [
    ("\\frac{3}{4}", "\\frac{3}{4}", True), ("3/4", "\\frac{3}{4}", True), ("\\dfrac{3}{4}", "\\frac34", True),
    ("0.5", "\\frac{1}{2}", True), ("x = 5", "5", True), ("5^\\circ", "5", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True), ("10\\%", "10", True), ("\\sqrt2", "\\sqrt{2}", True),
    ("4", "5", False), ("\\frac{1}{3}", "\\frac{1}{2}", False),
    # words are answers too, not units to strip; an empty answer matches nothing; commas group digits or list
    ("\\text{even}", "\\text{odd}", False), ("\\text{odd}", "\\text{odd}", True), ("", "\\text{Monday}", False),
    ("5 \\text{ cm}", "5", True), ("10,\\!000", "10000", True), ("1,2", "12", False), ("1,000", "1000", True),
])
def test_math_equivalence(predicted, reference, equal):
    assert scoring.math_equal(predicted, reference) is equal


def test_math_and_bbh_extraction():
    assert scoring.extract_math_answer("so $x = \\boxed{\\frac{a}{\\sqrt{b}}}$ and done") == "\\frac{a}{\\sqrt{b}}"
    assert scoring.extract_math_answer("The answer is 42.") == "42"
    assert scoring.extract_math_answer("so $\\boxed 5$, as in {the set}") == "5"  # no brace of its own
    assert scoring.extract_math_answer("$\\fbox{7}$") == "7"
    assert scoring.extract_bbh_answer("True and False is False. So the answer is False.") == "False"
    assert scoring.bbh_equal("(A)", "(A)") and not scoring.bbh_equal("(B)", "(A)")


def test_pass_at_1_with_correct_and_wrong_solutions():
    item = BENCHMARKS["humaneval"].load(DATA, None)[0]
    assert run_program(item.program("    return a + b\n")).passed
    wrong = run_program(item.program("    return a - b\n"))
    assert not wrong.passed and wrong.status == "failed" and "AssertionError" in wrong.detail
    mbpp = BENCHMARKS["mbpp"].load(DATA, None)[0]
    assert run_program(mbpp.program("def maximum(a, b):\n    return max(a, b)")).passed
    assert not run_program(mbpp.program("def maximum(a, b):\n    return a")).passed


def test_hostile_programs_fail_alone(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    hostile = {
        "infinite loop": ("while True:\n    pass", "timeout"),
        "fork bomb": ("import os\nwhile True:\n    os.fork()", "os.fork is not allowed"),
        "huge allocation": ("x = bytearray(10**11)", "MemoryError"),
        "deleting files": (f"import os\nos.remove({str(precious)!r})", "outside the working directory"),
        "wiping a tree": (f"import shutil\nshutil.rmtree({str(tmp_path)!r})", "outside the working directory"),
        "reading user files": (f"open({str(precious)!r}).read()", "no access"),
        "network": ("import socket\nsocket.create_connection(('127.0.0.1', 9))", "not allowed"),
        "subprocess": ("import subprocess\nsubprocess.run(['true'])", "import _posixsubprocess is not allowed"),
        "native code": ("import ctypes\nctypes.CDLL(None)", "import ctypes is not allowed"),
        "raising limits": ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "not allowed"),
        # the guard's own state and helpers are out of the program's reach
        "re-arming the guard": ("import __main__, os\nvars(__main__).clear()\nos.system('true')",
                                "os.system is not allowed"),
        "faking realpath": (f"import os\nr = os.getcwd()\nos.path.realpath = lambda *a, **k: r\n"
                            f"open({str(precious)!r}).read()", "no access"),
        "faking builtins": (f"import builtins\nbuiltins.any = lambda *a: True\nbuiltins.type = lambda x: int\n"
                            f"open({str(precious)!r}).read()", "no access"),
        "a directory descriptor": (f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
                                   "os.open('x', os.O_WRONLY | os.O_CREAT, dir_fd=fd)", "os.open is not allowed"),
        "leaving the directory": ("import os\nos.chdir('..')", "os.chdir is not allowed"),
        "linking out": (f"import os\nos.symlink({str(precious)!r}, 'link')", "os.symlink is not allowed"),
        "flooding stderr": ("import sys\nwhile True:\n    sys.stderr.write('x' * 65536)", "xxxxxxxx"),
        # leaving before the tests run is no pass
        "exit(0) first": ("import sys\nsys.exit(0)\nassert False", "exited (0) before it finished"),
        "exit() first": ("exit()\nassert False", "exited (None) before it finished"),
        "os._exit(0) first": ("import os\nos._exit(0)\nassert False", "ended before its tests finished"),
        "reading the guard's state": ("import gc\ngc.get_objects()", "gc.get_objects is not allowed"),
        "sqlite outside": (f"import sqlite3\nsqlite3.connect({str(tmp_path / 'x.db')!r})", "sqlite3.connect is not"),
    }
    for name, (program, expected) in hostile.items():
        outcome = run_program(program, timeout=3)
        assert not outcome.passed, name
        assert expected in (outcome.detail if outcome.status != "timeout" else "timeout"), (name, outcome)
    assert precious.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]
    assert run_program("open('scratch.txt', 'w').write('ok')\nimport os\nos.remove('scratch.txt')").passed
    assert run_program("import os, glob, json, collections\nos.mkdir('d')\nopen('d/a', 'w').close()\n"
                       "assert os.listdir('d') == ['a'] and glob.glob('d/*') == ['d/a']\nprint('x' * 10**6)").passed


class Scripted:
    """A stand-in model answering from a table of prompts: the evaluator's plumbing without a model."""

    def __init__(self, tokenizer: Tokenizer, answers: dict[str, str]) -> None:
        self.tokenizer, self.answers = tokenizer, answers

    def _answer(self, ids: list[int]) -> str:
        return self.answers[self.tokenizer.decode(ids, skip_special_tokens=True)]

    def loglikelihoods(self, requests, desc):
        return [(0.0 if self.tokenizer.decode(cont).strip() == self._answer(ctx) else -5.0, True)
                for ctx, cont in requests]

    def generate(self, prompts, params):
        return [self._answer(ids) for ids in prompts]


def correct_answer(name, item):
    if name in ("mmlu", "ceval", "cmmlu"):
        return item.reference
    solutions = {"gsm8k": f" So it is {item.reference}. The answer is {item.reference}.",
                 "math": f"We get $\\boxed{{{item.reference}}}$.",
                 "bbh": f" Thinking. So the answer is {item.reference}."}
    if name in solutions:
        return solutions[name]
    tasks = [json.loads(line) for line in (DATA / name / ("HumanEval.jsonl" if name == "humaneval" else
                                                           "mbpp.jsonl")).read_text().splitlines()]
    by_id = {(t["task_id"] if name == "humaneval" else f"mbpp/{t['task_id']}"): t for t in tasks}
    task = by_id[item.id]
    return task["canonical_solution"] if name == "humaneval" else task["code"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer_files(path)
    return Tokenizer.from_pretrained(path)


def test_a_scripted_model_that_is_always_right_scores_100(tokenizer):
    for name, benchmark in BENCHMARKS.items():
        items = benchmark.load(DATA, None)
        scripted = Scripted(tokenizer, {item.prompt: correct_answer(name, item) for item in items})
        result = Evaluator(scripted).run(name, DATA)
        assert result.score == 100.0, (name, [s for s in result.samples if not s["correct"]])


class ScriptedChat(Scripted):
    """A chat model: its prompts are user turns of the chat template, its answers prose around a code block; it
    honors stop strings as the engine does (the text is cut at the first one)."""

    def _answer(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return self.answers[text.removeprefix("User: ").removesuffix("\n\nAssistant:")]

    def generate(self, prompts, params):
        outputs = []
        for ids, p in zip(prompts, params, strict=True):
            text = self._answer(ids)
            cuts = [text.index(s) for s in p.stop if s in text]
            outputs.append(text[: min(cuts)] if cuts else text)
        return outputs


def test_a_chat_model_answering_in_code_blocks_passes_humaneval_and_mbpp(tokenizer):
    for name in ("humaneval", "mbpp"):
        items = BENCHMARKS[name].load(DATA, None)
        answers = {}
        for item in items:
            body = correct_answer(name, item)
            code = item.prompt + body if name == "humaneval" else body  # the whole function
            answers[item.prompt] = f"Here it is:\n```py\n{code}\n```\nIt returns what the docstring asks for."
        result = Evaluator(ScriptedChat(tokenizer, answers), chat=True).run(name, DATA)
        assert result.score == 100.0, (name, [s["detail"] for s in result.samples if not s["correct"]])


def test_a_model_that_always_answers_a_scores_the_share_of_a(tokenizer):
    for name in ("mmlu", "ceval", "cmmlu"):
        items = BENCHMARKS[name].load(DATA, None)
        result = Evaluator(Scripted(tokenizer, {item.prompt: "A" for item in items})).run(name, DATA)
        share = 100.0 * sum(item.reference == "A" for item in items) / len(items)
        assert result.score == pytest.approx(share) and 0 < share < 100


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    return tiny_checkpoint(path, max_position_embeddings=4096)


def test_a_failing_task_leaves_the_finished_ones_on_disk(checkpoint, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    (data / "math" / "test").rename(data / "math" / "gone")  # the second task's files are missing
    with pytest.raises(MissingData, match="math/test"):
        evaluate(checkpoint, ["gsm8k", "math"], data, tmp_path / "out", kv_cache_memory=32_000_000, use_tqdm=False,
                 dtype="float32", limit=2)
    audit = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(audit["scores"]) == ["gsm8k"] and audit["settings"]["shots"] is None


def test_every_task_end_to_end_through_the_engine(checkpoint, tmp_path):
    results = evaluate(checkpoint, list(BENCHMARKS), DATA, tmp_path, kv_cache_memory=32_000_000, use_tqdm=False,
                       dtype="float32")
    assert [r.benchmark.name for r in results] == list(BENCHMARKS)
    table = (tmp_path / "results.md").read_text()
    assert "| MMLU | English |" in table and "| HumanEval | Code |" in table and "| C-Eval | Chinese |" in table
    audit = json.loads((tmp_path / "results.json").read_text())
    assert set(audit["samples"]) == set(BENCHMARKS)
    assert all({"prompt", "answer", "reference", "correct"} <= set(s) for samples in audit["samples"].values()
               for s in samples)
    assert {"completion", "program"} <= set(audit["samples"]["humaneval"][0])


def test_engine_loglikelihoods_equal_a_plain_forward_pass(checkpoint):
    """The evaluator's multiple-choice path through the real engine (prompt log-probabilities, prefix cache)."""
    import torch

    llm = LLM(model=checkpoint, kv_cache_memory=8_000_000, dtype="float32")
    tok = llm.tokenizer
    context = tok.encode("The following are questions. Answer:")
    options = [tok.encode(f" {c}", add_special_tokens=False) for c in ["A", "B", "yes", "no way"]]
    scores = EngineBackend(llm, use_tqdm=False).loglikelihoods([(context, o) for o in options], "test")
    for option, (logprob, greedy) in zip(options, scores, strict=True):
        ids = context + option
        with torch.no_grad():
            logprobs = llm.model(torch.tensor([ids]))[0].log_softmax(-1)  # [T, vocab]
        steps = range(len(context) - 1, len(ids) - 1)
        assert logprob == pytest.approx(sum(logprobs[t, ids[t + 1]].item() for t in steps), abs=1e-4)
        assert greedy == all(int(logprobs[t].argmax()) == ids[t + 1] for t in steps)


def test_lm_eval_adapter_runs_a_local_task(checkpoint, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    import dsv2.eval.lm_eval  # noqa: F401  (registers "dsv2")

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": ["yes", "no"], "answer": a}) + "\n"
                            for q, a in [("Is the sky blue?", 0), ("Is fire cold?", 1), ("Do fish swim?", 0)]))
    (tmp_path / "dsv2_local_qa.yaml").write_text(f"""
task: dsv2_local_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (tmp_path / "dsv2_local_gen.yaml").write_text(f"""
task: dsv2_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
""")
    (tmp_path / "dsv2_local_ppl.yaml").write_text(f"""
task: dsv2_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}}"
metric_list:
  - metric: word_perplexity
""")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tmp_path))
    out = lm_eval.simple_evaluate(model="dsv2", model_args=f"pretrained={checkpoint},kv_cache_memory=8000000",
                                  tasks=["dsv2_local_qa", "dsv2_local_gen", "dsv2_local_ppl"], task_manager=manager)
    results = out["results"]
    model = DeepseekV2ForCausalLM.from_pretrained(checkpoint)
    tok = model.tokenizer

    def loglikelihood(context: str, continuation: str) -> float:  # straight from the model's logits
        ctx, cont = tok.encode(context), tok.encode(continuation, add_special_tokens=False)
        with torch.no_grad():
            logprobs = model(torch.tensor([ctx + cont]))[0].log_softmax(-1)  # [T, V]
        return sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))

    picks = [max(range(2), key=lambda c: loglikelihood(f"Question: {q}\nAnswer:", [" yes", " no"][c])) == a
             for q, a in [("Is the sky blue?", 0), ("Is fire cold?", 1), ("Do fish swim?", 0)]]
    assert results["dsv2_local_qa"]["acc,none"] == pytest.approx(sum(picks) / 3)
    assert "exact_match,none" in results["dsv2_local_gen"]  # generate_until ran through the engine
    assert results["dsv2_local_ppl"]["word_perplexity,none"] > 1


def test_lm_eval_rolling_loglikelihood_of_a_document_many_windows_long(checkpoint):
    """A document several times max_model_len: scored window by window, each window's total equal to the
    model's own log-probabilities of its predicted tokens."""
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from dsv2.eval.lm_eval import DSV2LM

    lm = DSV2LM(pretrained=str(checkpoint), max_model_len=32, kv_cache_memory=8_000_000)
    text = "An attention function maps a query and a set of key-value pairs to an output. " * 8
    [total] = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))], disable_tqdm=True)
    model = DeepseekV2ForCausalLM.from_pretrained(checkpoint)
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 3 * 32
    want = 0.0
    for context, predicted in map(make_disjoint_window, get_rolling_token_windows(ids, lm.bos, 30, 1)):
        with torch.no_grad():
            logprobs = model(torch.tensor([context + predicted]))[0].log_softmax(-1)  # [T, V]
        want += sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(predicted))
    assert total == pytest.approx(want, rel=1e-4)


def test_results_table_layout(tmp_path):
    from dsv2.eval.runner import TaskResult

    results = [TaskResult(BENCHMARKS["gsm8k"], 41.1, [{"correct": True}], 1.0)]
    table, audit = write_results(results, tmp_path, "m", {})
    assert "| GSM8K | Math | 41.1 | 1 |" in table.read_text() and json.loads(audit.read_text())["scores"]["gsm8k"]


def test_results_files_are_replaced_whole_never_left_torn(tmp_path, monkeypatch):
    from dsv2.eval.runner import TaskResult

    results = [TaskResult(BENCHMARKS["gsm8k"], 41.1, [{"correct": True}], 1.0)]
    table, audit = write_results(results, tmp_path, "m", {})
    before = table.read_text(), audit.read_text()
    plain_write = Path.write_text

    def interrupted_midway(self, text, *args, **kwargs):  # half the text reaches the disk, then Ctrl-C
        plain_write(self, text[:len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", interrupted_midway)
    with pytest.raises(KeyboardInterrupt):
        write_results([TaskResult(BENCHMARKS["gsm8k"], 99.0, [{"correct": True}] * 3, 1.0)], tmp_path, "m2", {})
    monkeypatch.undo()
    assert (table.read_text(), audit.read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]  # no temporary file left


def test_lm_eval_adapter_as_lm_evals_command_line_calls_it_on_a_machine_without_cuda(checkpoint, monkeypatch, caplog):
    """lm-eval's CLI passes device="cuda:0" and batch_size=1 unless told otherwise: without CUDA the model runs on
    the CPU (with a warning, as lm-eval's HFLM falls back), and the engine keeps its default batch."""
    pytest.importorskip("lm_eval")
    from dsv2.eval.lm_eval import DSV2LM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING"):
        lm = DSV2LM.create_from_arg_string(f"pretrained={checkpoint},kv_cache_memory=8000000",
                                           {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"})
    assert lm.llm.model.device.type == "cpu" and "CUDA is not available: using the CPU" in caplog.text
    assert lm.llm.engine.config.max_num_seqs == 64
    caplog.clear()
    with caplog.at_level("WARNING"):
        lm = DSV2LM.create_from_arg_string(f"pretrained={checkpoint},kv_cache_memory=8000000,max_num_seqs=1,"
                                           "max_model_lenn=64", {"batch_size": 1, "device": "cpu"})
    assert lm.llm.engine.config.max_num_seqs == 1
    assert "ignoring model_args it does not take: max_model_lenn" in caplog.text


def test_lm_eval_batch_sizes_and_bad_ones_refused_before_loading(monkeypatch):
    pytest.importorskip("lm_eval")
    import dsv2.eval.lm_eval as adapter

    size = adapter.engine_batch_size
    assert size() == size(1) == size("1") == size("auto") == size("auto:4") == 64
    assert size(8) == size("8") == 8 and size("auto", max_batch_size=16) == 16 and size(8, max_num_seqs=1) == 1

    def no_model(**kwargs):
        raise AssertionError("the model was loaded before its arguments were checked")

    monkeypatch.setattr(adapter, "LLM", no_model)
    for bad in ("abc", 0, "-3", "2.5"):
        with pytest.raises(ValueError, match=f"batch_size={bad!r} is not a positive integer or 'auto'"):
            adapter.DSV2LM(batch_size=bad)
    with pytest.raises(ValueError, match="max_num_seqs=0 is not a positive integer"):
        adapter.DSV2LM(max_num_seqs=0)
