"""The model card's benchmarks, read from their published file layouts under one data directory.

Expected layout (each folder as its original release ships it):

    DATA/mmlu/dev/<subject>_dev.csv, DATA/mmlu/test/<subject>_test.csv       (hendrycks/test: data/{dev,test})
    DATA/ceval/dev/<subject>_dev.csv, DATA/ceval/val/<subject>_val.csv       (C-Eval; the test split has no answers)
    DATA/cmmlu/dev/<subject>.csv, DATA/cmmlu/test/<subject>.csv               (CMMLU)
    DATA/bbh/bbh/<task>.json, DATA/bbh/cot-prompts/<task>.txt                 (suzgunmirac/BIG-Bench-Hard)
    DATA/gsm8k/train.jsonl, DATA/gsm8k/test.jsonl                            (openai/grade-school-math)
    DATA/math/train/<subject>/<n>.json, DATA/math/test/<subject>/<n>.json   (hendrycks/math)
    DATA/humaneval/HumanEval.jsonl[.gz]                                      (openai/human-eval)
    DATA/mbpp/mbpp.jsonl                                                      (google-research/mbpp)

Protocols: MMLU, C-Eval, CMMLU 5-shot multiple choice by the log-likelihood of the answer letter; BBH 3-shot
chain-of-thought, exact match; GSM8K 8-shot chain-of-thought (the first 8 training problems), numeric match; MATH
4-shot (the first 4 training problems), normalized-answer equivalence; HumanEval 0-shot and MBPP 3-shot (tasks 2–4
as examples, 11–510 tested), pass@1 with greedy decoding.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dsv2.eval import scoring

LETTERS = "ABCD"


@dataclass
class Item:
    """One question of a benchmark, ready to be asked."""

    id: str
    prompt: str  # the text the model continues (few-shot examples included)
    reference: str  # the gold answer (a letter, a number, a string, or the test code)
    choices: list[str] = field(default_factory=list)  # multiple choice: continuations to score
    stop: list[str] = field(default_factory=list)  # generation: where a completion ends
    max_tokens: int = 512
    program: Callable[[str], str] | None = None  # code: completion → program whose success means "passed"


@dataclass
class Benchmark:
    name: str
    title: str
    domain: str
    kind: str  # "choice" | "generate" | "code"
    load: Callable[[Path, int | None, int | None], list[Item]]  # (data dir, limit, shots: None = the protocol's)
    check: Callable[[str, str], tuple[str | None, bool]] | None = None  # (completion, reference) → (answer, ok)
    shots: int = 0  # the protocol's few-shot example count
    allowed_shots: tuple[int, ...] = (0,)  # the counts --shots may ask for

    def describe_shots(self) -> str:
        """The allowed counts in words: "0–5", "0 or 3", "0 only"."""
        allowed = sorted(self.allowed_shots)
        if len(allowed) == 1:
            return f"{allowed[0]} only"
        if allowed == list(range(allowed[0], allowed[-1] + 1)):
            return f"{allowed[0]}–{allowed[-1]}"
        return ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}"


class MissingData(FileNotFoundError):
    """A benchmark's files are not where the published layout puts them; the message says what to put where."""


class MalformedData(ValueError):
    """A benchmark's file does not hold what its release holds; the message names the file and the problem."""


@contextlib.contextmanager
def _reading(path: Path, expected: str) -> Iterator[None]:
    """Parsing errors inside the block become a MalformedData that names ``path`` and what it should hold."""
    try:
        yield
    except MalformedData:
        raise
    # a record of the wrong shape (a number where a string belongs, a list where an object does, ...), text that
    # is not UTF-8 (a ValueError), a .gz file that is not gzip or is cut short
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError, AttributeError, csv.Error,
            gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise MalformedData(f"{path}: not in the release's format, expected {expected} "
                            f"({type(e).__name__}: {e})") from None


def _malformed(path: Path, where: str, problem: str, expected: str) -> MalformedData:
    """The error for one record: ``PATH: not in the release's format at WHERE: PROBLEM; expected EXPECTED``."""
    return MalformedData(f"{path}: not in the release's format at {where}: {problem}; expected {expected}")


def _shown(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


TYPE_WORDS = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def _fields(record: object, path: Path, where: str, expected: str, strings: tuple[str, ...] = (),
            **types: type | tuple[type, ...]) -> dict:
    """``record`` is a JSON object whose ``strings`` are strings and whose other named fields have the given
    types (present fields only: list them in ``strings`` or ``types`` to require them); else a MalformedData that
    names the file, the record and the field."""
    if not isinstance(record, dict):
        raise _malformed(path, where, f"a JSON {type(record).__name__}, not an object", expected)
    wanted = {name: str for name in strings} | types
    missing = [name for name in wanted if name not in record]
    if missing:
        raise _malformed(path, where, f"the record lacks {', '.join(missing)}", expected)
    for name, kind in wanted.items():
        value = record[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            names = " or ".join(TYPE_WORDS.get(k, k.__name__) for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise _malformed(path, where, f"{name!r} is {_shown(value)}, not {names}", expected)
    return record


def _shot_count(name: str, shots: int | None) -> int:
    """The example count for benchmark ``name``: its protocol's (None) or ``shots`` if the benchmark allows it."""
    benchmark = BENCHMARKS[name]
    if shots is None:
        return benchmark.shots
    if shots not in benchmark.allowed_shots:
        raise ValueError(f"{name}: --shots {shots} is not allowed (allowed: {benchmark.describe_shots()}; the "
                         f"protocol uses {benchmark.shots})")
    return shots


def check_limit(limit: int | None) -> None:
    """``limit`` (questions per task) is None (every question) or a positive integer: 0 is not "no limit", and a
    negative count is not "all but the last"."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit {limit} is not allowed: it is the number of questions per task, at least 1 "
                         "(leave --limit out for every question)")


def _limited(items: list[Item], limit: int | None) -> list[Item]:
    check_limit(limit)
    return items if limit is None else items[:limit]


def check_tasks(tasks: list[str], shots: int | None = None, limit: int | None = None) -> None:
    """Before any task runs: ``tasks`` names at least one benchmark, each once; every name is a benchmark, and
    every one allows ``shots`` examples (None: each protocol's count); ``limit`` is None or at least 1; else one
    ValueError that names every unknown or repeated task, or every task that refuses ``shots`` with the counts it
    allows."""
    if not tasks:
        raise ValueError(f"no task selected: --tasks takes a comma-separated list of {', '.join(BENCHMARKS)}")
    unknown = [t for t in tasks if t not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    repeated = [t for t in dict.fromkeys(tasks) if tasks.count(t) > 1]
    if repeated:
        raise ValueError(f"task(s) {', '.join(repeated)} named more than once in --tasks; name each once")
    check_limit(limit)
    if shots is None:
        return
    refusing = [BENCHMARKS[t] for t in dict.fromkeys(tasks) if shots not in BENCHMARKS[t].allowed_shots]
    if refusing:
        suited = [name for name, b in BENCHMARKS.items() if shots in b.allowed_shots]
        hint = f"select tasks that allow it with --tasks (here: {','.join(suited)})" if suited else "no task allows it"
        raise ValueError(f"--shots {shots} is not allowed by "
                         + ", ".join(f"{b.name} (allowed: {b.describe_shots()})" for b in refusing)
                         + f"; {hint}, or leave --shots out for each task's protocol count")


def _need(path: Path, layout: str) -> Path:
    if not path.exists():
        raise MissingData(f"{path} is missing: expected {layout}")
    return path


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(\"line N\", the object) for every non-blank line."""
    opener = gzip.open if path.suffix == ".gz" else open
    expected = "one JSON object per line"
    records = []
    with _reading(path, expected), opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise _malformed(path, f"line {n}", f"not JSON ({e})", expected) from None
            if not isinstance(record, dict):
                raise _malformed(path, f"line {n}", f"a JSON {type(record).__name__}, not an object", expected)
            records.append((f"line {n}", record))
    return records


# ---------------------------------------------------------------------------------------------- multiple choice
def _choice_prompt(header: str, shots: list[tuple[str, list[str], str]], question: str, options: list[str],
                   answer_word: str, sep: str = ". ") -> str:
    def block(q: str, opts: list[str], answer: str | None) -> str:
        lines = [q, *(f"{letter}{sep}{opt}" for letter, opt in zip(LETTERS, opts, strict=True))]
        return "\n".join(lines) + f"\n{answer_word}" + (f" {answer}\n\n" if answer is not None else "")

    return header + "".join(block(q, o, a) for q, o, a in shots) + block(question, options, None)


def _mc_items(name: str, subjects: list[tuple[str, list[list[str]], list[list[str]]]], header: Callable[[str], str],
              answer_word: str, limit: int | None, shots: int = 5) -> list[Item]:
    """subjects: (subject, dev rows, test rows), each row [question, A, B, C, D, answer letter]."""
    items = []
    for subject, dev, test in subjects:
        examples = [(r[0], r[1:5], r[5]) for r in dev[:shots]]
        if len(examples) < shots:
            raise MalformedData(f"{name}/{subject}: the dev split has {len(examples)} examples, {shots}-shot needs "
                                f"{shots}")
        for n, row in enumerate(test):
            prompt = _choice_prompt(header(subject), examples, row[0], row[1:5], answer_word)
            items.append(Item(f"{name}/{subject}/{n}", prompt, row[5], choices=[f" {c}" for c in LETTERS]))
    return _limited(items, limit)


def _csv_rows(path: Path, header: bool, columns: list[str] | None = None) -> list[list[str]]:
    """Rows [question, A, B, C, D, answer letter]: the first six cells (no header) or the named ``columns``; a
    short row or an answer that is not one of A–D is refused with the file and its line."""
    expected = (f"a header with {', '.join(columns)}" if header else "rows of question, A, B, C, D, answer") + \
        ", the answer one of A, B, C, D"
    rows = []
    with _reading(path, expected), path.open(encoding="utf-8-sig", newline="") as f:  # a BOM is no text
        reader = csv.reader(f)
        if header:
            names = next(reader, None)
            lacking = [c for c in columns if c not in (names or [])]
            if lacking:
                raise _malformed(path, "its header", f"no column {', '.join(lacking)}", expected)
            at = [names.index(c) for c in columns]
        for row in reader:
            if not row:
                continue
            cells = [row[i] for i in at if i < len(row)] if header else row[:6]
            if len(cells) < 6:
                raise MalformedData(f"{path}: a row with fewer than 6 cells at line {reader.line_num}; "
                                    f"expected {expected}")
            cells[5] = cells[5].strip()
            if cells[5] not in tuple(LETTERS):
                raise _malformed(path, f"line {reader.line_num}", f"the answer is {cells[5]!r}", expected)
            rows.append(cells)
    return rows


def load_mmlu(data: Path, limit: int | None, shots: int | None = None) -> list[Item]:
    root = _need(data / "mmlu", "mmlu/dev/<subject>_dev.csv and mmlu/test/<subject>_test.csv")
    tests = sorted(_need(root / "test", "mmlu/test/<subject>_test.csv").glob("*_test.csv"))
    subjects = []
    for path in tests:
        subject = path.name.removesuffix("_test.csv")
        dev = _need(root / "dev" / f"{subject}_dev.csv", "mmlu/dev/<subject>_dev.csv for every test subject")
        subjects.append((subject, _csv_rows(dev, header=False), _csv_rows(path, header=False)))
    if not subjects:
        raise MissingData(f"{root / 'test'} holds no <subject>_test.csv files")

    def header(subject: str) -> str:
        return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"

    return _mc_items("mmlu", subjects, header, "Answer:", limit, _shot_count("mmlu", shots))


def load_ceval(data: Path, limit: int | None, shots: int | None = None) -> list[Item]:
    root = _need(data / "ceval", "ceval/dev/<subject>_dev.csv and ceval/val/<subject>_val.csv")
    columns = ["question", "A", "B", "C", "D", "answer"]
    subjects = []
    for path in sorted(_need(root / "val", "ceval/val/<subject>_val.csv").glob("*_val.csv")):
        subject = path.name.removesuffix("_val.csv")
        dev = _need(root / "dev" / f"{subject}_dev.csv", "ceval/dev/<subject>_dev.csv for every val subject")
        subjects.append((subject, _csv_rows(dev, True, columns), _csv_rows(path, True, columns)))
    if not subjects:
        raise MissingData(f"{root / 'val'} holds no <subject>_val.csv files")
    return _mc_items("ceval", subjects, lambda s: f"以下是中国关于{s}考试的单项选择题，请选出其中的正确答案。\n\n",
                     "答案：", limit, _shot_count("ceval", shots))


def load_cmmlu(data: Path, limit: int | None, shots: int | None = None) -> list[Item]:
    root = _need(data / "cmmlu", "cmmlu/dev/<subject>.csv and cmmlu/test/<subject>.csv")
    columns = ["Question", "A", "B", "C", "D", "Answer"]
    subjects = []
    for path in sorted(_need(root / "test", "cmmlu/test/<subject>.csv").glob("*.csv")):
        dev = _need(root / "dev" / path.name, "cmmlu/dev/<subject>.csv for every test subject")
        subjects.append((path.stem, _csv_rows(dev, True, columns), _csv_rows(path, True, columns)))
    if not subjects:
        raise MissingData(f"{root / 'test'} holds no <subject>.csv files")
    return _mc_items("cmmlu", subjects, lambda s: f"以下是关于{s}的单项选择题，请直接给出正确答案的选项。\n\n",
                     "答案：", limit, _shot_count("cmmlu", shots))


# -------------------------------------------------------------------------------------------------- generation
def load_bbh(data: Path, limit: int | None, shots: int | None = None) -> list[Item]:
    _shot_count("bbh", shots)  # 0 or 3: the release's chain-of-thought prompts hold 3 examples
    root = _need(data / "bbh", "bbh/bbh/<task>.json and bbh/cot-prompts/<task>.txt")
    items = []
    for path in sorted(_need(root / "bbh", "bbh/bbh/<task>.json").glob("*.json")):
        prompt_file = _need(root / "cot-prompts" / f"{path.stem}.txt", "bbh/cot-prompts/<task>.txt for every task")
        cot = ""
        if shots != 0:
            with _reading(prompt_file, "UTF-8 text: a header, -----, then the chain-of-thought examples"):
                cot = prompt_file.read_text(encoding="utf-8").split("-----", 1)[-1].strip() + "\n\n"
        expected = '{"examples": [{"input": "...", "target": "..."}, ...]} with string inputs and targets'
        with _reading(path, expected):
            examples = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(examples, dict) or not isinstance(examples.get("examples"), list):
                raise _malformed(path, "the top level", f"{_shown(examples)} has no \"examples\" list", expected)
            for n, example in enumerate(examples["examples"]):
                _fields(example, path, f"example {n}", expected, ("input", "target"))
                prompt = f"{cot}Q: {example['input']}\nA: Let's think step by step."
                items.append(Item(f"bbh/{path.stem}/{n}", prompt, example["target"], stop=["\n\nQ:"],
                                  max_tokens=384))
    return _limited(items, limit)


def load_gsm8k(data: Path, limit: int | None, shots: int | None = None) -> list[Item]:
    root = _need(data / "gsm8k", "gsm8k/train.jsonl and gsm8k/test.jsonl")
    train_path, test_path = _need(root / "train.jsonl", "gsm8k/train.jsonl (the examples come from it)"), _need(
        root / "test.jsonl", "gsm8k/test.jsonl")
    expected = 'objects with "question" and "answer" (a solution ending "#### <number>")'

    def records(path: Path) -> list[dict]:
        """Every record checked now, the test split's included: not after the model has answered it."""
        out = []
        for where, ex in _read_jsonl(path):
            _fields(ex, path, where, expected, ("question", "answer"))
            parts = ex["answer"].split("####")
            if len(parts) != 2 or not parts[1].strip():
                raise _malformed(path, where, f"the answer {_shown(ex['answer'])} does not end in one "
                                 "\"#### <number>\"", expected)
            out.append(ex)
        return out

    train = records(train_path)[:_shot_count("gsm8k", shots)]
    test = records(test_path)

    def solution(answer: str) -> str:
        reasoning, final = answer.split("####")
        return f"{reasoning.strip()} The answer is {final.strip()}."

    examples = "".join(f"Question: {ex['question']}\nAnswer: {solution(ex['answer'])}\n\n" for ex in train)
    items = [Item(f"gsm8k/{n}", f"{examples}Question: {ex['question']}\nAnswer:",
                  scoring.gsm8k_reference(ex["answer"]), stop=["\n\nQuestion:", "\nQuestion:"], max_tokens=384)
             for n, ex in enumerate(test)]
    return _limited(items, limit)


def load_math(data: Path, limit: int | None, shots: int | None = None) -> list[Item]:
    root = _need(data / "math", "math/train/<subject>/<n>.json and math/test/<subject>/<n>.json")

    def problems(split: str) -> list[dict]:
        files = sorted(_need(root / split, f"math/{split}/<subject>/<n>.json").glob("*/*.json"),
                       key=lambda p: (p.parent.name, (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem)))
        out = []
        for p in files:
            expected = 'an object with "problem" and "solution" (strings)'
            with _reading(p, expected):
                record = _fields(json.loads(p.read_text(encoding="utf-8")), p, "the top level", expected,
                                 ("problem", "solution"))
                out.append({"problem": record["problem"], "solution": record["solution"],
                            "id": f"{p.parent.name}/{p.stem}"})
        return out

    count = _shot_count("math", shots)
    shots = "".join(f"Problem:\n{ex['problem']}\n\nSolution:\n{ex['solution']}\n\n"
                    for ex in problems("train")[:count])
    items = []
    for ex in problems("test"):
        answer = scoring.last_boxed(ex["solution"])
        if answer is None:
            continue
        items.append(Item(f"math/{ex['id']}", f"{shots}Problem:\n{ex['problem']}\n\nSolution:\n", answer,
                          stop=["\n\nProblem:"], max_tokens=512))
    return _limited(items, limit)


# ------------------------------------------------------------------------------------------------------- code
CODE_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\n#", "\nprint(", "\nassert "]


def load_humaneval(data: Path, limit: int | None, shots: int | None = None) -> list[Item]:
    _shot_count("humaneval", shots)  # 0-shot only: the prompt is the function to complete
    root = _need(data / "humaneval", "humaneval/HumanEval.jsonl (or .jsonl.gz)")
    path = root / "HumanEval.jsonl"
    path = path if path.exists() else _need(root / "HumanEval.jsonl.gz", "humaneval/HumanEval.jsonl (or .jsonl.gz)")
    items = []
    expected = 'objects with "task_id", "prompt", "test" and "entry_point" (strings)'
    with _reading(path, expected):
        for where, ex in _read_jsonl(path):
            def program(completion: str, ex: dict = ex) -> str:
                return f"{ex['prompt']}{completion}\n\n{ex['test']}\n\ncheck({ex['entry_point']})\n"

            # now, not when the first program is built
            _fields(ex, path, where, expected, ("task_id", "prompt", "test", "entry_point"))
            items.append(Item(ex["task_id"], ex["prompt"], ex["test"], stop=CODE_STOP, max_tokens=512,
                              program=program))
    return _limited(items, limit)


def _mbpp_block(task: dict, with_code: bool) -> str:
    tests = "\n".join(task["test_list"])
    text = (f"You are an expert Python programmer, and here is your task: {task['text']} Your code should pass "
            f"these tests:\n\n{tests}\n")
    return text + (f"[BEGIN]\n{task['code']}\n[DONE]\n\n" if with_code else "[BEGIN]\n")


def load_mbpp(data: Path, limit: int | None, shots: int | None = None) -> list[Item]:
    path = _need(data / "mbpp" / "mbpp.jsonl", "mbpp/mbpp.jsonl")
    expected = 'objects with "task_id" (an integer), "text", "code" (strings) and "test_list" (a list of strings)'
    with _reading(path, expected):
        tasks = {}
        for where, task in _read_jsonl(path):  # every record checked now, not when its prompt or program is built
            _fields(task, path, where, expected, ("text", "code"), task_id=int, test_list=list)
            if "test_setup_code" in task:
                _fields(task, path, where, expected, ("test_setup_code",))
            if not task["test_list"] or not all(isinstance(test, str) for test in task["test_list"]):
                # no tests: any completion would pass
                raise _malformed(path, where, f"'test_list' is {_shown(task['test_list'])}, not a list of test "
                                 "strings", expected)
            tasks[task["task_id"]] = task
        examples = (2, 3, 4)[:_shot_count("mbpp", shots)]
        missing = [i for i in examples if i not in tasks]
        if missing:
            raise MissingData(f"mbpp/mbpp.jsonl lacks the example tasks {missing} (the 3-shot prompt uses tasks 2–4)")
        shots = "".join(_mbpp_block(tasks[i], True) for i in examples)
    items = []
    for task_id in sorted(t for t in tasks if 11 <= t <= 510):
        task = tasks[task_id]

        def program(completion: str, task: dict = task) -> str:
            return f"{completion}\n\n{task.get('test_setup_code', '')}\n" + "\n".join(task["test_list"]) + "\n"

        items.append(Item(f"mbpp/{task_id}", shots + _mbpp_block(task, False), "\n".join(task["test_list"]),
                          stop=["[DONE]"], max_tokens=512, program=program))
    return _limited(items, limit)


def _check_number(completion: str, reference: str) -> tuple[str | None, bool]:
    answer = scoring.extract_number(completion)
    return answer, scoring.numbers_equal(answer, reference)


def _check_math(completion: str, reference: str) -> tuple[str | None, bool]:
    answer = scoring.extract_math_answer(completion)
    return answer, scoring.math_equal(answer, reference)


def _check_bbh(completion: str, reference: str) -> tuple[str | None, bool]:
    answer = scoring.extract_bbh_answer(completion)
    return answer, scoring.bbh_equal(answer, reference)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("mmlu", "MMLU", "English", "choice", load_mmlu, shots=5, allowed_shots=tuple(range(6))),
    Benchmark("bbh", "BBH", "English", "generate", load_bbh, _check_bbh, shots=3, allowed_shots=(0, 3)),
    Benchmark("ceval", "C-Eval", "Chinese", "choice", load_ceval, shots=5, allowed_shots=tuple(range(6))),
    Benchmark("cmmlu", "CMMLU", "Chinese", "choice", load_cmmlu, shots=5, allowed_shots=tuple(range(6))),
    Benchmark("humaneval", "HumanEval", "Code", "code", load_humaneval, shots=0, allowed_shots=(0,)),
    Benchmark("mbpp", "MBPP", "Code", "code", load_mbpp, shots=3, allowed_shots=tuple(range(4))),
    Benchmark("gsm8k", "GSM8K", "Math", "generate", load_gsm8k, _check_number, shots=8, allowed_shots=tuple(range(9))),
    Benchmark("math", "MATH", "Math", "generate", load_math, _check_math, shots=4, allowed_shots=tuple(range(9))),
]}
