"""Smoke runs of the side-by-side benchmarks (`--quick`): each must finish and print its table. Slow: minutes each."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize(("script", "table_header"), [
    ("bench_generate.py", "| measurement | dtype | transformers | dsv2 |"),
    ("bench_engine.py", "| measurement | dtype | transformers | dsv2 engine | ratio |"),
    ("bench_train.py", "| precision | transformers, s/step | dsv2, s/step |"),
    ("bench_serve.py", "| clients |"),
    ("bench_parallel.py", "| layout | output tok/s |"),
    ("bench_cuda.py", "| measurement | transformers | dsv2 | dsv2 speed-up | dsv2 vs bound |"),  # a CPU runs it too
])
def test_benchmark_runs_and_prints_its_table(script, table_header):
    run = subprocess.run([sys.executable, script, "--quick"], cwd=BENCHMARKS, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    assert table_header in run.stdout
    assert "(total " in run.stdout  # reached the end
