"""Training throughput: one optimizer step of dsv2 vs transformers' DeepseekV2ForCausalLM on the same checkpoint.

    python benchmarks/bench_train.py [--precisions bfloat16] [--batch 8] [--seq-len 512] [--steps 4] [--quick]
    python benchmarks/bench_train.py --precisions float32    # plain float32 as well: another ~10 minutes

The shared mid-size random checkpoint (see bench_generate.py) is loaded by both implementations with float32 master
weights. A step is what dsv2's trainer does: forward (under bfloat16 autocast, or plain float32), cross-entropy over
every next token (dsv2: `model(x, targets=y, return_aux=True)`, its head and loss a chunk of tokens at a time, plus
its expert balance loss `aux_loss`; transformers: its logits, then torch's cross_entropy; its model has no balance
loss), backward, gradient clipping at 1.0 and an AdamW step (`dsv2.train.optim.make_optimizer` for both: lr 4.2e-4,
β (0.9, 0.95), weight decay 0.1 on matrices). transformers runs with its fastest (experts, attention) implementation
pair: all are screened by a forward + backward on one sequence, the close ones timed again on the full batch
(batched_mm is not tried when it would gather more than 2 GiB of expert weights). Both run in this process on 2
threads, in rounds: a warm-up round of three untimed steps each (a training run's steady state: oneDNN builds its
matmul kernels for the shapes it meets in the first steps), then per round each implementation is loaded afresh and
takes an untimed step and a timed one, the two alternating (which one goes first alternates too) so that the speed
drifts of this shared machine (up to 2× within minutes) hit both alike; tokens/s is the median of each one's timed
steps, on a fixed batch of random tokens; the median of the per-round ratios (the two steps of a round taken back to
back) is printed too. The process keeps freed memory for reuse (`dsv2.malloc.keep_freed_memory`, as dsv2's trainer
does on CPU): both implementations run with it. Peak RSS of the default run: ~19 GB (transformers' step is the
larger).

Model FLOPs utilization: (6 × active parameters without the embedding lookup × tokens + causal attention, 3 × the
forward's QKᵀ and PV over the expanded heads) ÷ step time ÷ the machine's matmul FLOP/s in that precision (measured
after the precision's runs; bfloat16 for autocast).

``--quick``: 2 sequences × 128 tokens, one timed step, bfloat16 only (a smoke run).
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dsv2 import DeepseekV2ForCausalLM, ModelConfig
from dsv2.info import summarize
from dsv2.malloc import keep_freed_memory
from dsv2.train.optim import make_optimizer

from bench_generate import (
    CpuAccount,
    bench_config,
    describe_checkpoint,
    load_theirs,
    mark,
    matmul_flops,
    write_checkpoint,
)

THREADS = 2
SPEEDUP_GOAL = 2.0  # dsv2 / transformers training tokens/s
LR = 4.2e-4  # TrainConfig's default
GRAD_CLIP = 1.0
WARM_UP_STEPS = 3
BATCHED_MM_LIMIT = 2 * 2**30
FINALIST_FACTOR = 1.5  # pairs this close to the fastest on one sequence are timed again on the full batch
FINALIST_ROUNDS = 2  # timed full-batch passes per finalist, alternating; each one's fastest counts
SHORT = {"float32": "fp32", "bfloat16": "bf16 autocast"}

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # tokens [B, T + 1] → (loss, cross-entropy)


@dataclass
class Settings:
    batch: int
    seq_len: int
    steps: int  # timed steps, after WARM_UP_STEPS untimed ones
    pick_batch: int = 1  # sequences of the forward + backward that picks transformers' implementations


@dataclass
class Run:
    """One implementation in one precision."""

    step_s: list[float] = field(default_factory=list)
    step_faults: list[int] = field(default_factory=list)  # minor page faults of the process during each timed step
    first_ce: float = 0.0  # cross-entropy of the first step (computed on the checkpoint's weights)
    impl: str = ""
    tried: str = ""

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)


def random_tokens(config: ModelConfig, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """[batch, seq_len + 1]: inputs are [:, :-1], targets [:, 1:]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, config.vocab_size, (batch, seq_len + 1), generator=generator)


def autocast(precision: str) -> AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bfloat16" else nullcontext()


# ---------------------------------------------------------------------------------------------- the two models
def ours_loss(model: DeepseekV2ForCausalLM, precision: str) -> LossFn:
    def loss_fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(precision):
            out = model(x[:, :-1], targets=x[:, 1:], return_aux=True)
        return out.loss + out.aux_loss, out.loss

    return loss_fn


def theirs_loss(model, precision: str) -> LossFn:
    def loss_fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(precision):
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
        ce = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        return ce, ce

    return loss_fn


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, x: torch.Tensor) -> float:
    """One optimizer step. → the step's cross-entropy."""
    optimizer.zero_grad(set_to_none=True)
    loss, ce = loss_fn(x)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    return ce.item()


@dataclass
class Trainee:
    """One implementation loaded to train: its model, a fresh optimizer and its loss."""

    model: nn.Module
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.optimizer = make_optimizer(self.model, lr=LR)

    def step(self, x: torch.Tensor) -> tuple[float, float, int]:
        """One optimizer step → (seconds, cross-entropy, minor page faults meanwhile)."""
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        ce = train_step(self.model, self.optimizer, self.loss_fn, x)
        seconds = time.perf_counter() - start
        return seconds, ce, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def timed_rounds(loaders: list[Callable[[], Trainee]], runs: list[Run], x: torch.Tensor, steps: int) -> None:
    """A warm-up round: each implementation loaded in turn, WARM_UP_STEPS untimed steps (the first one's
    cross-entropy kept). Then `steps` rounds: each loaded in turn (which one goes first alternates), one untimed
    step, one timed. Rounds make the speed drifts of this shared machine (up to 2× within minutes) hit both alike,
    and only one implementation's weights, gradients and optimizer state are in memory at a time."""
    for i in range(steps + 1):
        order = list(zip(loaders, runs, strict=True))
        for load, run in order if i % 2 == 0 else order[::-1]:
            trainee = load()
            if i == 0:
                run.first_ce = trainee.step(x)[1]
                for _ in range(WARM_UP_STEPS - 1):
                    trainee.step(x)
            else:
                trainee.step(x)  # the optimizer's state is created, the reloaded weights are touched
                seconds, _, faults = trainee.step(x)
                run.step_s.append(seconds)
                run.step_faults.append(faults)
            del trainee
            gc.collect()


def batched_mm_bytes(config: ModelConfig, tokens: int) -> int:
    """What transformers' batched_mm experts gather in one forward pass (float32 master weights)."""
    return tokens * config.num_experts_per_tok * 3 * config.hidden_size * config.moe_intermediate_size * 4


def forward_backward_s(model: nn.Module, loss_fn: LossFn, x: torch.Tensor) -> float:
    """Seconds of one forward + backward (no optimizer step: the weights stay as they are); gradients dropped."""
    start = time.perf_counter()
    loss_fn(x)[0].backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def pick_theirs(model, precision: str, config: ModelConfig, settings: Settings) -> tuple[str, str, str]:
    """transformers' fastest (experts, attention) implementation pair for training (the optimizer step costs every
    pair the same). A screen: one forward + backward each on `pick_batch` sequences of the real length; then the
    pairs within FINALIST_FACTOR of the best there, forward + backward on the full batch (an untimed pass each,
    then FINALIST_ROUNDS alternating timed ones), the fastest taken: on one sequence eager and sdpa attention trade
    places from run to run. → (experts, attention, what was tried)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    x = random_tokens(config, settings.pick_batch, settings.seq_len, seed=1)
    loss_fn = theirs_loss(model, precision)
    forward_backward_s(model, loss_fn, x[:, :65])  # the first backward's one-time costs, paid by no candidate
    tried, times = [], {}
    for experts in ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]:
        gathered = batched_mm_bytes(config, settings.batch * settings.seq_len)
        if experts == "batched_mm" and gathered > BATCHED_MM_LIMIT:
            tried.append(f"batched_mm not tried (would gather {gathered / 2**30:.0f} GiB of expert weights)")
            continue
        for attn in ("sdpa", "eager"):
            try:
                use(model, experts, attn)
                times[experts, attn] = forward_backward_s(model, loss_fn, x)
            except Exception as e:  # CUDA-only kernels, missing packages, no backward
                model.zero_grad(set_to_none=True)
                tried.append(f"{experts}+{attn} does not run ({type(e).__name__})")
                continue
            tried.append(f"{experts}+{attn} {times[experts, attn]:.2f} s")
    best = min(times.values())
    finalists = [pair for pair, seconds in times.items() if seconds <= FINALIST_FACTOR * best]
    if len(finalists) > 1 and settings.batch > settings.pick_batch:
        full = random_tokens(config, settings.batch, settings.seq_len, seed=1)
        full_times = {pair: [] for pair in finalists}
        for round_ in range(FINALIST_ROUNDS + 1):  # round 0: each pair's first pass over the full batch's shapes
            for pair in finalists if round_ % 2 == 0 else finalists[::-1]:
                use(model, *pair)
                seconds = forward_backward_s(model, loss_fn, full)
                if round_ > 0:
                    full_times[pair].append(seconds)
        times = {pair: min(seconds) for pair, seconds in full_times.items()}
        tried.append("on the full batch: " + ", ".join(f"{e}+{a} {times[e, a]:.2f} s" for e, a in finalists))
    experts, attn = min(finalists, key=times.get)
    use(model, experts, attn)
    return experts, attn, ", ".join(tried)


def use(model, experts: str, attn: str) -> None:
    """Switch transformers' model to this experts and attention implementation."""
    model.set_experts_implementation(experts)
    model.set_attn_implementation(attn)


def ours_loader(path: str, precision: str) -> Callable[[], Trainee]:
    def load() -> Trainee:
        model = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False).train()
        return Trainee(model, ours_loss(model, precision))

    return load


def theirs_loader(path: str, precision: str, config: ModelConfig, settings: Settings,
                  run: Run) -> Callable[[], Trainee]:
    """Picks transformers' implementation pair once (recorded in ``run``); the loader applies it."""
    model = load_theirs(path, torch.float32, private_weights=True).train()
    experts, attn, run.tried = pick_theirs(model, precision, config, settings)
    run.impl = f"experts={experts}, attn={attn}"
    del model
    gc.collect()

    def load() -> Trainee:
        model = load_theirs(path, torch.float32, experts, attn, private_weights=True).train()
        return Trainee(model, theirs_loss(model, precision))

    return load


# ------------------------------------------------------------------------------------------------------- report
def step_flops(config: ModelConfig, batch: int, seq_len: int) -> float:
    """6 FLOPs per active parameter (the embedding lookup excluded, the output head included) per token, plus
    causal attention over the expanded heads: forward QKᵀ and PV = L · n_h · T² · (qk + v) per sequence, ×3."""
    summary = summarize(config)
    active = summary.activated_params - summary.embedding_params
    attention = config.num_hidden_layers * config.num_attention_heads * seq_len**2 * (
        config.qk_head_dim + config.v_head_dim)
    return 6 * active * batch * seq_len + 3 * attention * batch


def paired_ratios(theirs: Run, ours: Run) -> list[float]:
    """Each round's transformers step time ÷ dsv2's: the two ran back to back, so a drift of this machine's speed
    between rounds cancels out."""
    return [t / o for t, o in zip(theirs.step_s, ours.step_s, strict=True)]


def table_row(precision: str, theirs: Run, ours: Run, tokens: int, flops: float, peak: float) -> str:
    t, o = tokens / theirs.median_s, tokens / ours.median_s
    return (f"| {SHORT[precision]} | {theirs.median_s:.2f} | {ours.median_s:.2f} | {t:,.0f} | {o:,.0f} | {o / t:.2f}× "
            f"| {flops / theirs.median_s / peak:.1%} | {flops / ours.median_s / peak:.1%} | {peak / 1e9:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["bfloat16"], choices=["bfloat16", "float32"],
                        help="bfloat16: autocast over float32 master weights (the trainer's default); float32: plain")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per implementation and precision")
    parser.add_argument("--quick", action="store_true", help="2 × 128 tokens, 1 timed step, bfloat16 only")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    keep_freed_memory()
    if args.quick:
        settings, precisions = Settings(batch=2, seq_len=128, steps=1), ["bfloat16"]
    else:
        settings, precisions = Settings(batch=args.batch, seq_len=args.seq_len, steps=args.steps), args.precisions
    config = bench_config()
    tokens = settings.batch * settings.seq_len
    flops = step_flops(config, settings.batch, settings.seq_len)
    print(f"{describe_checkpoint(config)}; batch {settings.batch} × {settings.seq_len} tokens = {tokens} tokens "
          f"per step, {flops / 1e12:.2f} TFLOP per step", flush=True)
    account = CpuAccount()
    x = random_tokens(config, settings.batch, settings.seq_len, seed=0)
    rows, notes, goals = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(config, tmp)
        for precision in precisions:
            matmul_dtype = getattr(torch, precision)
            ours, theirs = Run(impl="attn_impl=auto (expanded for training)"), Run()
            loaders = [ours_loader(tmp, precision), theirs_loader(tmp, precision, config, settings, theirs)]
            timed_rounds(loaders, [ours, theirs], x, settings.steps)
            print(f"{precision}: dsv2 {tokens / ours.median_s:,.0f} tokens/s, transformers ({theirs.impl}) "
                  f"{tokens / theirs.median_s:,.0f} tokens/s", flush=True)
            peak = matmul_flops(matmul_dtype, config)
            rows.append(table_row(precision, theirs, ours, tokens, flops, peak))
            notes.append(f"{SHORT[precision]}: transformers with {theirs.impl} (candidates: {theirs.tried}); "
                         f"cross-entropy of the first step on the checkpoint's weights: dsv2 {ours.first_ce:.4f}, "
                         f"transformers {theirs.first_ce:.4f}; step times dsv2 "
                         f"{', '.join(f'{s:.2f}' for s in ours.step_s)} s, transformers "
                         f"{', '.join(f'{s:.2f}' for s in theirs.step_s)} s; minor page faults per timed step "
                         f"(the heap still grows in a run's first steps; 4 KiB each) dsv2 "
                         f"{', '.join(f'{n:,}' for n in ours.step_faults)}, transformers "
                         f"{', '.join(f'{n:,}' for n in theirs.step_faults)}")
            speedup = theirs.median_s / ours.median_s
            paired = paired_ratios(theirs, ours)
            paired_median = statistics.median(paired)
            notes.append(f"{SHORT[precision]}: per-round ratios (transformers' step ÷ dsv2's, the two taken back to "
                         f"back) {', '.join(f'{r:.2f}' for r in paired)}: median {paired_median:.2f}×")
            met = speedup >= SPEEDUP_GOAL and paired_median >= SPEEDUP_GOAL
            goals.append(f"goal: dsv2 training ≥ {SPEEDUP_GOAL:.0f}× transformers' tokens/s ({SHORT[precision]}): "
                         f"{speedup:.2f}× (ratio of the medians), {paired_median:.2f}× (median of the per-round "
                         f"ratios) {mark(met)}")
    print()
    print("| precision | transformers, s/step | dsv2, s/step | transformers, tokens/s | dsv2, tokens/s | ratio | "
          "transformers MFU | dsv2 MFU | matmul peak, GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("\n".join(notes))
    print()
    print("\n".join(goals))
    print(f"\n{account.summary()}")


if __name__ == "__main__":
    main()
