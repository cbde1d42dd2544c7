"""Running the benchmarks through the engine, and writing the score table and the audit file.

Every prompt of a task goes to the engine at once: continuous batching runs them together and the prefix cache
computes each few-shot prefix once. Multiple choice scores each option by the log-likelihood of its continuation
(prompt log-probabilities); generation is greedy; code is executed in the sandbox.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv2.engine.llm import LLM
from dsv2.eval.sandbox import run_programs
from dsv2.eval.tasks import BENCHMARKS, Benchmark, Item, check_tasks
from dsv2.json_files import write_text_atomically
from dsv2.sampling import SamplingParams


def loglikelihoods(llm: LLM, requests: list[tuple[list[int], list[int]]], desc: str = "log-likelihoods",
                   use_tqdm: bool = True) -> list[tuple[float, bool]]:
    """For each (context, continuation) of token ids: log p(continuation | context), summed over its tokens, and
    whether it is the greedy continuation (every token the most likely)."""
    for context, continuation in requests:
        if not continuation:
            raise ValueError("a continuation needs at least one token")
        if not context:
            raise ValueError("a context needs at least one token (start it with BOS)")
    params = [SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, prompt_logprobs_start=len(context))
              for context, _ in requests]
    outputs = llm.generate(prompt_token_ids=[context + continuation for context, continuation in requests],
                           sampling_params=params, use_tqdm=use_tqdm, desc=desc)
    return [_score(out.prompt_logprobs, out.prompt_token_ids, len(out.prompt_token_ids) - 1) for out in outputs]


def _score(logprobs: list, ids: list[int], last: int) -> tuple[float, bool]:
    first = next(i for i, entry in enumerate(logprobs) if entry is not None)
    entries = [logprobs[p][ids[p]] for p in range(first, last + 1)]
    return sum(e.logprob for e in entries), all(e.rank == 1 for e in entries)


@dataclass
class TaskResult:
    benchmark: Benchmark
    score: float  # percent
    samples: list[dict[str, Any]]
    seconds: float


class EngineBackend:
    """What the evaluator needs of a model, served by dsv2's engine."""

    def __init__(self, llm: LLM, use_tqdm: bool = True) -> None:
        if llm.tokenizer is None:
            raise ValueError("evaluation needs the model's tokenizer (tokenizer.json in the model folder)")
        self.llm, self.tokenizer, self.use_tqdm = llm, llm.tokenizer, use_tqdm

    def loglikelihoods(self, requests: list[tuple[list[int], list[int]]], desc: str) -> list[tuple[float, bool]]:
        return loglikelihoods(self.llm, requests, desc, self.use_tqdm)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[str]:
        outputs = self.llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=self.use_tqdm)
        return [out.outputs[0].text for out in outputs]


class Evaluator:
    """Runs benchmarks against a backend (``loglikelihoods``, ``generate`` and a ``tokenizer``)."""

    def __init__(self, backend: EngineBackend, chat: bool = False) -> None:
        self.backend, self.tokenizer, self.chat = backend, backend.tokenizer, chat

    def prompt_ids(self, text: str) -> list[int]:
        """Base models continue the text (after BOS); chat models get it as a user turn of the chat template."""
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return self.tokenizer.encode(text)

    def run(self, name: str, data_dir: Path, limit: int | None = None, shots: int | None = None) -> TaskResult:
        """One benchmark: at most ``limit`` questions, ``shots`` examples each (None: the protocol's count)."""
        if name not in BENCHMARKS:
            raise ValueError(f"unknown task {name!r}; choose from {', '.join(BENCHMARKS)}")
        benchmark = BENCHMARKS[name]
        items = benchmark.load(Path(data_dir), limit, shots)
        if not items:
            raise ValueError(f"{name}: no questions found under {data_dir}")
        start = time.monotonic()
        samples = getattr(self, f"_run_{benchmark.kind}")(benchmark, items)
        score = 100.0 * sum(s["correct"] for s in samples) / len(samples)
        return TaskResult(benchmark, score, samples, time.monotonic() - start)

    def _run_choice(self, benchmark: Benchmark, items: list[Item]) -> list[dict]:
        requests = [(self.prompt_ids(item.prompt), self.tokenizer.encode(choice, add_special_tokens=False))
                    for item in items for choice in item.choices]
        scores = self.backend.loglikelihoods(requests, f"{benchmark.title} (log-likelihoods)")
        samples, i = [], 0
        for item in items:
            options = scores[i:i + len(item.choices)]
            i += len(item.choices)
            best = max(range(len(options)), key=lambda k: options[k][0])
            answer = item.choices[best].strip()
            samples.append({"id": item.id, "prompt": item.prompt, "logprobs": {c.strip(): lp for c, (lp, _) in
                                                                              zip(item.choices, options, strict=True)},
                            "answer": answer, "reference": item.reference, "correct": answer == item.reference})
        return samples

    def _generate(self, benchmark: Benchmark, items: list[Item], stops: bool = True) -> list[str]:
        params = [SamplingParams(temperature=0, max_tokens=item.max_tokens, stop=(item.stop or None) if stops else None)
                  for item in items]
        return self.backend.generate([self.prompt_ids(item.prompt) for item in items], params)

    def _run_generate(self, benchmark: Benchmark, items: list[Item]) -> list[dict]:
        samples = []
        for item, completion in zip(items, self._generate(benchmark, items), strict=True):
            answer, correct = benchmark.check(completion, item.reference)
            samples.append({"id": item.id, "prompt": item.prompt, "completion": completion, "answer": answer,
                            "reference": item.reference, "correct": correct})
        return samples

    def _run_code(self, benchmark: Benchmark, items: list[Item]) -> list[dict]:
        # a base model continues the function until the next top-level statement (the stop strings); a chat model
        # answers with a code block that holds such statements itself: it runs to its end of turn
        completions = [self._code_of(c) for c in self._generate(benchmark, items, stops=not self.chat)]
        programs = [item.program(code) for item, code in zip(items, completions, strict=True)]
        outcomes = run_programs(programs)
        return [{"id": item.id, "prompt": item.prompt, "completion": code, "program": program,
                 "answer": outcome.status, "detail": outcome.detail, "reference": "tests pass",
                 "correct": outcome.passed}
                for item, code, program, outcome in zip(items, completions, programs, outcomes, strict=True)]

    def _code_of(self, completion: str) -> str:
        """A chat model answers in prose around a code block: take the block."""
        if self.chat:
            match = re.search(r"```(?:python3?|py)?[ \t]*\n(.*?)(?:```|$)", completion, flags=re.DOTALL)
            if match:
                return "\n" + match.group(1)
        return completion


def write_results(results: list[TaskResult], out: Path, model: str, settings: dict[str, Any]) -> tuple[Path, Path]:
    """results.md: the model card's table (benchmark, domain, score); results.json: every sample, for auditing."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"Model: `{model}`", "", "| Benchmark | Domain | Score | Questions |", "|---|---|---|---|"]
    lines += [f"| {r.benchmark.title} | {r.benchmark.domain} | {r.score:.1f} | {len(r.samples)} |" for r in results]
    table = out / "results.md"
    write_text_atomically(table, "\n".join(lines) + "\n")
    audit = out / "results.json"
    write_text_atomically(audit, json.dumps({
        "model": model, "settings": settings,
        "scores": {r.benchmark.name: {"score": r.score, "questions": len(r.samples), "seconds": r.seconds}
                   for r in results},
        "samples": {r.benchmark.name: r.samples for r in results},
    }, ensure_ascii=False, indent=1))
    return table, audit


def evaluate(model: str | Path | None, tasks: list[str], data_dir: str | Path, out: str | Path,
             limit: int | None = None, chat: bool = False, batch_size: int = 64, use_tqdm: bool = True,
             shots: int | None = None, **engine_args: Any) -> list[TaskResult]:
    """`dsv2 eval`: every task in turn through one engine; writes OUT/results.md and OUT/results.json after each
    task, so that a task that fails (a malformed file, an interrupt) leaves the finished ones on disk. Unknown tasks
    and a ``shots`` count that a task does not allow (or a ``limit`` under 1) are refused before the model is
    loaded."""
    check_tasks(tasks, shots, limit)
    llm = LLM(model=model, max_num_seqs=batch_size, **engine_args)
    evaluator = Evaluator(EngineBackend(llm, use_tqdm), chat=chat)
    settings = {"tasks": tasks, "limit": limit, "chat": chat, "shots": shots}
    results = []
    for task in tasks:
        results.append(evaluator.run(task, Path(data_dir), limit, shots))
        write_results(results, Path(out), str(model or "bundled"), settings)
    return results

