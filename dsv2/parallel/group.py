"""A group of ranks for the engine: this process is rank 0, one worker process per other device.

Tensor parallel: every rank builds the model on the meta device, swaps in its parallel modules (`shard_model`) and
reads only its slice of each checkpoint tensor from the safetensors files — no rank ever holds the whole model. Rank
0 runs the engine: it schedules, sends each step's tensors (`ModelRunner.prepare`) to the workers' queues and
samples; every rank runs the step through its own shard and its own latent cache, the collectives (torch.distributed:
gloo on the CPU, NCCL on GPUs) happening inside the model's parallel layers.

Data-parallel attention (``data_parallel=True``, `shard_for_data_parallel`): every rank has its own requests and its
own cache, so the cache capacity grows with the ranks. Rank 0 still schedules them all (one scheduler per rank,
`dsv2.engine.data_parallel`), sends each rank its own batch — an idle rank gets a one-token dummy, since the MoE
layers' all-to-alls need every rank — and collects every rank's logits (`gather_logits`) to sample them.

A worker that dies makes rank 0 raise `WorkerDiedError` at the next step (or mid-step, from the failed collective);
a rank 0 that dies makes the workers exit. A step that fails on rank 0 after the workers got it (an error, an
out-of-memory, Ctrl-C) leaves the ranks out of step — a worker may wait in a collective rank 0 never reaches — so every
later step raises `ParallelGroupError`: restart the engine.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv2.config import DTYPES, ModelConfig
from dsv2.engine.runner import ModelRunner, PagedLatentCache
from dsv2.engine.scheduler import Batch
from dsv2.malloc import keep_freed_memory
from dsv2.model import DeepseekV2ForCausalLM
from dsv2.parallel.process_group import end_process_group
from dsv2.parallel.tensor_parallel import SKIP, check_split, shard_for_data_parallel, shard_model
from dsv2.weights import load_weights

log = logging.getLogger("dsv2.parallel")
T = TypeVar("T")
DEATH_GRACE_S = 1.0  # after a failed step, how long to wait for a worker's exit before blaming the step itself


class ParallelGroupError(RuntimeError):
    """The parallel group cannot run steps any more; the engine must be restarted."""


class WorkerDiedError(ParallelGroupError):
    """A rank of the parallel group is gone."""


def load_sharded(path: str | Path, rank: int, world: int, expert_parallel: bool, dtype: torch.dtype,
                 device: torch.device, data_parallel: bool = False) -> DeepseekV2ForCausalLM:
    """This rank's shard of a checkpoint: the parallel model, filled with the slices of the tensors it owns."""
    config = ModelConfig.from_pretrained(path)
    with torch.device("meta"):
        full = DeepseekV2ForCausalLM(config)
        model = DeepseekV2ForCausalLM(config)
    shard = shard_for_data_parallel if data_parallel else shard_model
    plan = shard(model, rank, world, expert_parallel)
    model.to(dtype)
    model.to_empty(device=device)
    model.tie_weights()
    params = dict(model.named_parameters())

    def place(slot, shape):
        index = plan.index(slot.param, slot.expert, shape)
        if index == SKIP:
            return None
        target = params[slot.param]
        if slot.expert is not None:
            target = target[plan.local_expert(slot.param, slot.expert)]
        return target, index

    load_weights(model, path, full_model=full, place=place, progress=None if rank == 0 else False)  # one bar
    return model.eval()


def resident_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def gather_logits(logits: torch.Tensor, rows: int) -> list[torch.Tensor] | None:
    """Data parallel: every rank's step logits [B_r, K_r, V] as B_r·K_r rows, padded to ``rows`` (the most any rank
    has: at most a step's token budget), collected on rank 0 — a list of [rows, V] by rank there, None elsewhere."""
    flat = logits.flatten(0, 1)  # [B_r·K_r, V]
    padded = flat.new_zeros(rows, flat.shape[-1])  # [rows, V]
    padded[: flat.shape[0]] = flat
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
    dist.gather(padded, parts, dst=0)
    return parts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int, device: torch.device) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Collectives run only inside steps, where every rank takes part; idle workers wait on their queue instead.
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=10))


def _exit_with_parent(parent: int) -> None:
    """A worker must not outlive rank 0 (it would wait for steps forever)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            print(f"dsv2 worker {os.getpid()}: rank 0 (pid {parent}) is gone; exiting", file=sys.stderr)
            os._exit(1)


def _worker(rank: int, world: int, port: int, path: str, dtype_name: str, device_name: str, expert_parallel: bool,
            data_parallel: bool, block_size: int, threads: int, parent: int, steps: mp.Queue,
            reports: mp.Queue) -> None:
    """Load this rank's shard, report "loaded", take the cache size from rank 0, report "ready", then run steps."""
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    device = torch.device(device_name if device_name != "cuda" else f"cuda:{rank}")
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if device.type == "cpu":
            keep_freed_memory()  # as LLMEngine does
        _init(rank, world, port, device)
        model = load_sharded(path, rank, world, expert_parallel, DTYPES[dtype_name], device, data_parallel)
        reports.put((rank, "loaded", resident_bytes(model)))
        num_blocks = steps.get()  # rank 0 sizes the cache once every shard is resident; None: it gave up
        if num_blocks is not None:
            runner = ModelRunner(model, PagedLatentCache(model.config, num_blocks, block_size, model.dtype, device))
            reports.put((rank, "ready", None))
            while (step := steps.get()) is not None:
                logits = runner.execute({k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                                         for k, v in step.items()})
                if data_parallel:
                    gather_logits(logits, step["gather_rows"])
    except Exception as e:  # a loading error, or a failed collective because another rank went away
        reports.put((rank, "failed", f"{type(e).__name__}: {e}"))
        print(f"dsv2 worker rank {rank}: {type(e).__name__}: {e}", file=sys.stderr)
        os._exit(1)
    end_process_group()


class ParallelGroup:
    """Starts the workers and owns rank 0's shard; its runner (`make_runner`) drives all ranks.

    ``num_blocks_for(config, dtype)`` sizes the latent cache (blocks of ``block_size`` tokens, the same on every
    rank); it is called once every rank holds its shard, so that a budget measured from free memory leaves the
    weights their room. A failed start-up stops the workers and the process group before raising.
    ``data_parallel``: attention data parallel (every rank its own requests and cache) instead of tensor parallel.
    """

    def __init__(self, path: str | Path, world: int, expert_parallel: bool, dtype: torch.dtype | None,
                 device: torch.device, num_blocks_for: Callable[[ModelConfig, torch.dtype], int],
                 start_timeout: float = 600.0, *, block_size: int = 16, data_parallel: bool = False) -> None:
        what = "data_parallel_size" if data_parallel else "tensor_parallel_size"
        if world < 2:
            raise ValueError(f"a parallel group needs at least 2 ranks ({what}={world})")
        if device.type == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(f"{what}={world} but only {torch.cuda.device_count()} CUDA devices")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be at least 1")
        check_split(ModelConfig.from_pretrained(path), world, expert_parallel, data_parallel)  # before any rank starts
        self.world, self.block_size, self.data_parallel, self.closed = world, block_size, data_parallel, False
        self.broken: str | None = None  # why the ranks are out of step, after a failed step
        self.caller_threads = torch.get_num_threads()  # rank 0 takes its share of the cores until close()
        self.workers, self.steps = [], []
        # At exit, before multiprocessing's own handler terminates the (daemonic) workers: stopped that way, a worker
        # runs none of its finalizers, and the semaphores it made (tqdm's lock) are reported leaked.
        atexit.register(self.close)
        try:
            self._start(path, expert_parallel, dtype, device, num_blocks_for, start_timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, path: str | Path, expert_parallel: bool, dtype: torch.dtype | None, device: torch.device,
               num_blocks_for: Callable[[ModelConfig, torch.dtype], int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        config = ModelConfig.from_pretrained(path)
        dtype = dtype or config.dtype
        port = _free_port()
        context = mp.get_context("spawn")
        threads = max(1, torch.get_num_threads() // self.world)
        self.steps = [context.Queue() for _ in range(1, self.world)]
        reports = context.Queue()
        self.workers = [
            context.Process(target=_worker, daemon=True, name=f"dsv2-rank{rank}",
                            args=(rank, self.world, port, str(path), str(dtype).removeprefix("torch."), device.type,
                                  expert_parallel, self.data_parallel, self.block_size, threads, os.getpid(),
                                  self.steps[rank - 1], reports))
            for rank in range(1, self.world)
        ]
        for worker in self.workers:
            worker.start()
        torch.set_num_threads(threads)
        _init(0, self.world, port, device if device.type != "cuda" else torch.device("cuda:0"))
        self.model = load_sharded(path, 0, self.world, expert_parallel, dtype, device, self.data_parallel)
        self.rank_bytes = [resident_bytes(self.model), *self._wait_for(reports, "loaded", deadline, timeout)]
        self.num_blocks = num_blocks_for(config, dtype)  # now that the weights take their memory on every rank
        self.send(self.num_blocks)
        self._wait_for(reports, "ready", deadline, timeout)

    def _wait_for(self, reports: mp.Queue, expected: str, deadline: float, timeout: float) -> list:
        """Every worker's report ``expected`` (its detail, by rank), or WorkerDiedError."""
        details: dict[int, object] = {}
        while len(details) < len(self.workers):
            try:
                rank, status, detail = reports.get(timeout=0.5)
            except queue.Empty:
                self.check_workers()
                if time.monotonic() > deadline:
                    raise WorkerDiedError(f"parallel workers did not start within {timeout:g} s") from None
                continue
            if status != expected:
                raise WorkerDiedError(f"parallel worker rank {rank} failed to start: {detail}")
            details[rank] = detail
        return [details[rank] for rank in sorted(details)]

    def make_runner(self, cache: PagedLatentCache) -> DistributedRunner | DataParallelRunner:
        return (DataParallelRunner if self.data_parallel else DistributedRunner)(self.model, cache, self)

    def check_workers(self, grace: float = 0.0) -> None:
        """Raise WorkerDiedError if a worker has exited (waiting up to ``grace`` seconds for one to do so), or
        ParallelGroupError if a failed step left the ranks out of step."""
        self._check_alive(grace)
        if self.broken is not None:
            raise ParallelGroupError(f"a step failed on rank 0 ({self.broken}) after the workers had started it; "
                                     "the ranks are out of step — restart the engine")

    def run_sent_step(self, compute: Callable[[], T]) -> T:
        """Run rank 0's part of a step the workers already have. If it fails, the group is marked broken (later
        steps raise), and a worker found dead within a grace period is blamed instead — a collective that fails
        because a rank died under it can do so just before the rank is seen to exit."""
        try:
            return compute()
        except BaseException as e:
            self.broken = f"{type(e).__name__}: {e}"
            self._check_alive(grace=DEATH_GRACE_S)
            raise

    def _check_alive(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while True:
            dead = [(i + 1, w.exitcode) for i, w in enumerate(self.workers) if not w.is_alive()]
            if dead:
                rank, code = dead[0]
                raise WorkerDiedError(f"parallel worker rank {rank} exited (exit code {code}); the engine "
                                      "cannot continue — restart it")
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def send(self, step: dict | None) -> None:
        for q in self.steps:
            q.put(step)

    def send_each(self, steps: list[dict]) -> None:
        """Rank r (r ≥ 1) gets ``steps[r - 1]``."""
        for q, step in zip(self.steps, steps, strict=True):
            q.put(step)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        self.send(None)
        for worker in self.workers:
            if worker.pid is None:  # never started
                continue
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
        end_process_group()
        torch.set_num_threads(self.caller_threads)


def _for_queue(step: dict) -> dict:
    """The step with its tensors copied to fresh CPU memory for a worker's queue. Never the caller's own tensors:
    the queue's feeder thread moves a tensor's storage into shared memory when it pickles it, later, and would free
    the memory under rank 0 while rank 0's step still reads it (seen as rare wrong tokens)."""
    return {k: (v.to("cpu", copy=True) if isinstance(v, torch.Tensor) else v) for k, v in step.items()}


class DistributedRunner(ModelRunner):
    """Rank 0's runner (tensor parallel): prepares each step, sends it to the workers, runs its own shard of it."""

    def __init__(self, model: DeepseekV2ForCausalLM, cache: PagedLatentCache, group: ParallelGroup) -> None:
        super().__init__(model, cache)
        self.group = group

    @torch.no_grad()
    def run(self, batch: Batch, extra: list[list[int]] | None = None) -> torch.Tensor:
        self.group.check_workers()
        step = self.prepare(batch, extra)
        self.group.send(_for_queue(step))
        return self.group.run_sent_step(lambda: self.execute(step))


class DataParallelRunner(DistributedRunner):
    """Rank 0's runner under data-parallel attention: one batch per rank (from each rank's own scheduler) in one
    step; the logits of all of them come back to rank 0."""

    def run(self, batch: Batch, extra: list[list[int]] | None = None) -> torch.Tensor:
        raise TypeError("a data-parallel group runs every rank's batch together: use run_all()")

    def idle_step(self) -> dict[str, torch.Tensor | None]:
        """One padding token that reads and writes only the trash slot: an idle rank's share of the all-to-alls."""
        def one(value: int) -> torch.Tensor:
            return torch.tensor([[value]], dtype=torch.long, device=self.device)  # [1, 1]

        trash = self.cache.trash_slot
        return {"input_ids": one(0), "positions": one(0), "write_slots": one(trash), "read_slots": one(trash),
                "mask": None, "logits_at": one(0)}

    @torch.no_grad()
    def run_all(self, batches: list[tuple[Batch, list[list[int]]] | None]) -> list[torch.Tensor | None]:
        """``batches[r]``: rank r's batch and its extra logit positions, or None (idle) → rank r's logits
        [B_r, K_r, vocab] (None where idle)."""
        assert len(batches) == self.group.world
        self.group.check_workers()
        steps = [self.prepare(*scheduled, device=self.device if rank == 0 else "cpu") if scheduled
                 else self.idle_step() for rank, scheduled in enumerate(batches)]
        shapes = [tuple(step["logits_at"].shape) for step in steps]  # (B_r, K_r)
        rows = max(B * K for B, K in shapes)
        self.group.send_each([{**_for_queue(step), "gather_rows": rows} for step in steps[1:]])
        parts = self.group.run_sent_step(lambda: gather_logits(self.execute(steps[0]), rows))
        return [None if scheduled is None else logits[: B * K].view(B, K, -1)
                for scheduled, (B, K), logits in zip(batches, shapes, parts, strict=True)]
