"""The training loop: pre-training and SFT with the paper's recipe, on one process or under torchrun.

One optimizer step covers ``batch_size`` sequences: every rank draws the same global batch (the data order is
deterministic), takes its share, and runs it in micro-batches. The loss of a step is the mean cross-entropy over all
its target tokens plus the expert balance loss; each micro-batch's contribution is scaled so that gradients (summed
over micro-batches, averaged over ranks) equal those of that global mean whatever the split — which is what makes a
2-rank run match a 1-rank run, and a resumed run match an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dsv2.config import PRESETS, ModelConfig, parse_dtype
from dsv2.malloc import keep_freed_memory
from dsv2.model import DeepseekV2ForCausalLM
from dsv2.model.transformer import copy_whole_
from dsv2.parallel.expert_parallel import (
    check_expert_split,
    dropped_counts,
    expert_parameter_names,
    protected_tokens,
    set_token_dropping,
    shard_experts,
)
from dsv2.train.checkpoint import (
    STATE_FILE,
    checkpoint_step,
    commit,
    copy_tokenizer,
    latest_checkpoint,
    load_state,
    rank_file,
    resume_hint,
    staging_dir,
)
from dsv2.train.config import TrainConfig
from dsv2.train.data import PackedDataset, TokenFile, index_path
from dsv2.train.losses import add_device_balance_losses, balance_over, limit_devices
from dsv2.train.metrics import MetricsLog, plot_metrics
from dsv2.train.optim import learning_rate, make_optimizer
from dsv2.train.parallel import Distributed, gather_experts, init_distributed
from dsv2.train.sft import ChatDataset

log = logging.getLogger("dsv2.train")


class TrainingStopped(RuntimeError):
    """The run cannot go on (repeated non-finite losses); the message says why."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says at which step, and where a re-run resumes."""


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: the next sequence is order(epoch)[index]
    index: int = 0


def model_config_for(config: TrainConfig) -> ModelConfig:
    """The config of the model a run trains: the preset's with ``model_overrides``, ``init_std`` and
    ``aux_loss_alpha``, or the checkpoint folder's config.json (read only: no weights are loaded)."""
    if config.model not in PRESETS:
        return ModelConfig.from_pretrained(config.model)
    model_config = ModelConfig.preset(config.model)
    if config.model_overrides:
        try:
            model_config = ModelConfig.from_dict({**model_config.to_dict(), **config.model_overrides})
        except ValueError as e:  # a value of the wrong type, or out of range
            raise ValueError(f"train config model_overrides: {e}") from None
    model_config = model_config.replace(initializer_range=config.init_std)
    if config.aux_loss_alpha is not None:
        model_config = model_config.replace(aux_loss_alpha=config.aux_loss_alpha)
    return model_config


def build_model(config: TrainConfig, device: torch.device, rank: int = 0, world_size: int = 1,
                shard: Callable[[DeepseekV2ForCausalLM], None] | None = None,
                ) -> DeepseekV2ForCausalLM:
    """A fresh model from a preset (init std ``init_std``) or a checkpoint folder (the Trainer finds the tokenizer).

    A preset is built on the meta device, its experts sharded (expert parallelism: each rank holds only its own; they
    are ~58 of V2-Lite's ~63 GB in float32) and ``shard`` applied (FSDP: `fully_shard_model`) before its weights are
    allocated and drawn, with the values the whole model would have (`init_weights` seeded per parameter and
    expert), so no rank ever holds the whole model. A checkpoint is read as this rank's model (with expert
    parallelism, its own experts only), then ``shard`` is applied."""
    if config.model in PRESETS:
        model_config = model_config_for(config)
        with torch.device("meta"):
            model = DeepseekV2ForCausalLM(model_config)
        if config.expert_parallel > 1:
            shard_experts(model, rank, world_size)
        tied = model_config.tie_word_embeddings  # to_empty would untie a head sharded with the embedding
        if shard is not None and not tied:
            shard(model)
        model.to_empty(device=device)
        model.tie_weights()  # to_empty replaces parameters one module at a time, which unties them
        model.init_weights(seed=config.seed)
        if shard is not None and tied:
            shard(model)
    else:
        model = _load_for_training(config.model, config.expert_parallel, device, rank, world_size)
        if shard is not None:
            shard(model)
        if config.aux_loss_alpha is not None:  # the layers' and the saved config.json's
            for module in model.modules():
                if hasattr(module, "aux_loss_alpha"):
                    module.aux_loss_alpha = config.aux_loss_alpha
            model.config = model.config.replace(aux_loss_alpha=config.aux_loss_alpha)
    return model.train()


def _load_for_training(path: str | Path, expert_parallel: int, device: torch.device, rank: int,
                       world_size: int) -> DeepseekV2ForCausalLM:
    """A checkpoint in float32: whole, or with expert parallelism this rank's expert-parallel model."""
    if expert_parallel > 1:
        from dsv2.parallel.group import load_sharded

        return load_sharded(path, rank, world_size, expert_parallel=True, dtype=torch.float32, device=device,
                            data_parallel=True)
    return DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32, device=device)


def fully_shard_model(model: DeepseekV2ForCausalLM) -> None:
    """FSDP2 over every decoder layer and the rest of the model, on the meta device or not; with expert parallelism
    each rank's routed experts are already its own, and FSDP shards everything else."""
    from torch.distributed.fsdp import fully_shard

    names = set(expert_parameter_names(model))
    experts = {p for name, p in model.named_parameters() if name in names}
    for layer in model.model.layers:
        fully_shard(layer, ignored_params=experts & set(layer.parameters()) or None)
    fully_shard(model, ignored_params=experts or None)


# Settings a resumed run must share with its checkpoint: they decide the model and the data's order. (The length of
# training, the learning rate, logging and saving may change; the files may move; the model's tensors are compared.)
RESUME_MUST_MATCH = ("model_overrides", "seq_len", "batch_size", "seed", "val_fraction")


class Trainer:
    def __init__(self, config: TrainConfig, dist_ctx: Distributed | None = None) -> None:
        config.validate()
        self.config = config
        self.dist = dist_ctx or init_distributed()
        ranks = self.dist.world_size
        if config.batch_size % (config.micro_batch_size * ranks):  # before anything is loaded
            raise ValueError(f"batch_size={config.batch_size} must be a multiple of micro_batch_size × ranks = "
                             f"{config.micro_batch_size * ranks}")
        self.out = Path(config.out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"out = {self.out}: is a file, not a folder for the run's checkpoints and logs")
        if config.tokenizer is not None and not Path(config.tokenizer).is_dir():
            raise FileNotFoundError(f"tokenizer = {config.tokenizer}: no such folder (one with tokenizer.json)")
        self.device = self.dist.device
        if self.device.type == "cpu":
            keep_freed_memory()  # steps reuse the last step's freed blocks instead of faulting in fresh pages
        if config.expert_parallel > 1 and config.expert_parallel != self.dist.world_size:
            raise ValueError(f"expert_parallel={config.expert_parallel} must equal the number of ranks "
                             f"({self.dist.world_size})")
        # the data and its vocabulary first: a mismatch is found before the model is built
        token_file = None if config.sft_data else TokenFile.open(config.data)
        self.tokenizer_dir = self._tokenizer_dir(token_file)
        self.dataset = self._dataset(token_file)
        model_config = model_config_for(config)
        self._check_vocabulary(model_config.vocab_size)
        if config.expert_parallel > 1:
            check_expert_split(model_config, config.expert_parallel, "expert_parallel")
        fsdp = self.dist.enabled and config.data_parallel == "fsdp"
        self.model = build_model(config, self.device, self.dist.rank, self.dist.world_size,
                                 shard=fully_shard_model if fsdp else None)
        self.model_config = self.model.config
        devices = config.expert_parallel
        if config.device_limit:
            limit_devices(self.model, devices, config.device_limit)
        add_device_balance_losses(self.model, devices, config.device_limit, config.device_balance_alpha,
                                  config.comm_balance_alpha)
        self.expert_params: list[str] = []
        if config.expert_parallel > 1:
            self.expert_params = expert_parameter_names(self.model)  # build_model sharded them
            assert self.expert_params, "build_model shards the experts under expert parallelism"
            set_token_dropping(self.model, config.token_drop_capacity)
        self.position = Position()
        self.total_steps = config.total_steps(self.dataset.num_train)
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is not None:
            self._load_weights(checkpoint)  # before DDP broadcasts rank 0's weights
        self.train_model = self._wrap_data_parallel()
        self.optimizer = make_optimizer(self.model, config.lr, config.weight_decay, (config.beta1, config.beta2))
        if checkpoint is not None:
            self._load_optimizer(checkpoint)
        if self.dist.is_main:
            self.metrics = MetricsLog(self.out / "metrics.jsonl", self.position.step if checkpoint else None)

    # -------------------------------------------------------------------------------------------------- set-up
    def _tokenizer_dir(self, token_file: TokenFile | None) -> Path | None:
        """The tokenizer copied into checkpoints: ``tokenizer``, else a checkpoint's own folder, else (a preset) the
        one the token file was made with, if it is still there."""
        config = self.config
        if config.tokenizer or config.model not in PRESETS:
            return Path(config.tokenizer or config.model)
        recorded = token_file.tokenizer if token_file is not None else None
        if recorded and Path(recorded).is_dir():
            return Path(recorded)
        if self.dist.is_main:
            why = f"the tokenizer {recorded} that {config.data} was made with no longer exists" if recorded else \
                "no tokenizer was given"
            log.warning("%s: %s/model will have no tokenizer files (which `dsv2 generate` needs); give --tokenizer",
                        why, self.out)
        return None

    def _dataset(self, token_file: TokenFile | None) -> PackedDataset | ChatDataset:
        if token_file is None:
            return ChatDataset.from_jsonl(self.config.sft_data, self.tokenizer_dir, self.config.seq_len,
                                          self.config.val_fraction, self.config.seed)
        return PackedDataset(token_file, self.config.seq_len, self.config.val_fraction, self.config.seed)

    def _check_vocabulary(self, model_vocab: int) -> None:
        """Every token id of the data, and of the tokenizer that made it, must have a row in the model's embedding."""
        config, dataset = self.config, self.dataset
        if isinstance(dataset, PackedDataset):
            data = f"{config.data} (its index {index_path(Path(config.data))})"
            tokenizer, tokenizer_vocab, largest = dataset.data.tokenizer, dataset.data.vocab_size, \
                dataset.data.max_token_id
        else:
            data, tokenizer = config.sft_data, self.tokenizer_dir
            tokenizer_vocab, largest = dataset.tokenizer_vocab_size, dataset.max_token_id
        model = f"preset {config.model}" if config.model in PRESETS else str(Path(config.model) / "config.json")
        needed = max(tokenizer_vocab or 0, (largest or -1) + 1)
        if needed <= model_vocab:
            return
        what = f"holds token id {largest}" if largest is not None and largest >= model_vocab else \
            f"was tokenized with {tokenizer}, of {tokenizer_vocab} ids"
        fix = "tokenize the data with the model's tokenizer"
        if config.model in PRESETS:
            fix += f", or set model_overrides' vocab_size to {needed} or more"
        raise ValueError(f"{data} {what}, but the model ({model}) has vocab_size {model_vocab}: {fix}")

    def _wrap_data_parallel(self) -> nn.Module:
        if not self.dist.enabled or self.config.data_parallel == "fsdp":  # build_model applied FSDP
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, list(self.expert_params))
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    def _load_weights(self, checkpoint: Path) -> None:
        """Model weights (this rank's expert slice), data position and random state of a checkpoint."""
        state = load_state(checkpoint)
        if state["world_size"] != self.dist.world_size or state["expert_parallel"] != self.config.expert_parallel:
            raise ValueError(f"{checkpoint} was written by {state['world_size']} rank(s) with expert_parallel="
                             f"{state['expert_parallel']}; resume it with the same layout")
        # after the layout check (another world size: a rank's file may not exist, and is not to blame), and before
        # any work, so that a missing or torn file is found now
        rank_state = load_state(checkpoint, self.dist.rank)
        saved, now = state.get("config", {}), self.config.to_dict()
        changed = [name for name in RESUME_MUST_MATCH if name in saved and saved[name] != now.get(name)]
        if changed:
            raise ValueError(f"{checkpoint} was written with " + ", ".join(f"{n}={saved[n]!r}" for n in changed)
                             + "; this run has " + ", ".join(f"{n}={now.get(n)!r}" for n in changed)
                             + ": resume with the same settings, or give another --out for a new run")
        # with expert parallelism: this rank's experts; under FSDP on the CPU, each shard's part then to the device
        device = torch.device("cpu") if self.config.data_parallel == "fsdp" and self.dist.enabled else self.device
        try:
            full = _load_for_training(checkpoint, self.config.expert_parallel, device, self.dist.rank,
                                      self.dist.world_size).state_dict()
        except (ValueError, OSError) as e:
            raise ValueError(f"cannot resume from {checkpoint}: {e}; {resume_hint(checkpoint)}") from None
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                source = full.get(name)
                if source is None or source.shape != tensor.shape:
                    raise ValueError(f"{checkpoint} holds another model than this run's: {name} is "
                                     f"{None if source is None else list(source.shape)} there, {list(tensor.shape)} "
                                     "here; resume with the same model, or give another --out for a new run")
                copy_whole_(tensor, source)  # under FSDP, its shard's part
        self.position = Position(**state["position"])
        torch.set_rng_state(rank_state["rng"])
        if self.dist.is_main:
            log.info("resuming from %s (step %d)", checkpoint, self.position.step)

    def _load_optimizer(self, checkpoint: Path) -> None:
        state = load_state(checkpoint, self.dist.rank)["optimizer"]
        self.optimizer.load_state_dict(_as_parameters(state, self.optimizer))

    # ---------------------------------------------------------------------------------------------- the loop
    def train(self) -> dict:
        position = self.position
        start_step = position.step
        bar = tqdm(total=self.total_steps, initial=start_step, desc="training", disable=not self.dist.is_main,
                   dynamic_ncols=True)
        started = time.monotonic()
        try:
            summary = self._loop(bar)
        except KeyboardInterrupt:
            raise TrainingInterrupted(f"interrupted after {position.step} of {self.total_steps} steps; "
                                      f"{self._resume_note()}") from None
        finally:
            bar.close()
        if self.dist.is_main:
            plot_metrics(self.metrics.read(), self.out / "plots")
            if start_step >= self.total_steps:
                log.info("the checkpoint is at step %d, steps = %d: nothing to train", start_step, self.total_steps)
            else:
                log.info("done: %d steps in %.0f s", self.total_steps - start_step, time.monotonic() - started)
        self.export()
        return summary

    def _resume_note(self) -> str:
        """What re-running the same command does: resume from the newest checkpoint, or start over."""
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is None:
            return "no checkpoint was saved yet: re-running the same command starts over"
        return (f"re-running the same command resumes from the last checkpoint, step {checkpoint_step(checkpoint)} "
                f"({checkpoint})")

    def _loop(self, bar: tqdm) -> dict:
        """Steps until ``total_steps``; the last step's record. Steps count from 1 in logs, metrics and checkpoints
        (``position.step`` is the number of steps done)."""
        config, position = self.config, self.position
        bad_steps = 0
        summary: dict = {}
        while position.step < self.total_steps:
            step_start = time.monotonic()
            record = self.train_step(position.step)
            if not math.isfinite(record["loss"]):
                bad_steps += 1
                if self.dist.is_main:
                    log.warning("step %d: non-finite loss (%s); step skipped (%d in a row)", position.step + 1,
                                record["loss"], bad_steps)
                if bad_steps >= config.max_bad_steps:
                    raise TrainingStopped(
                        f"{bad_steps} non-finite losses in a row (the last at step {position.step + 1}): lower the "
                        "learning rate or check the data (checkpoints are not saved while losses are non-finite); "
                        f"{self._resume_note()}")
            else:
                bad_steps = 0
            position.step += 1
            elapsed = time.monotonic() - step_start
            record["tokens_per_s"] = record["tokens"] / elapsed
            if self.dist.is_main:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
            step = position.step
            last = step == self.total_steps
            if step % config.eval_every == 0 or last:
                record.update(self.evaluate())
            if self.dist.is_main and (step % config.log_every == 0 or last or "val_loss" in record):
                self.metrics.write({"step": step, **record})
            summary = record
            # not during a streak of non-finite losses: keep_last would prune the checkpoints from before it
            if last or (step % config.save_every == 0 and not bad_steps):
                self.save()
            elif step % config.save_every == 0 and self.dist.is_main:
                log.warning("step %d: no checkpoint saved during non-finite losses", step)
        return summary

    def _autocast(self):
        if self.config.precision == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, step: int) -> dict:
        config, ranks, rank = self.config, self.dist.world_size, self.dist.rank
        lr = learning_rate(step, self.total_steps, config.lr, config.warmup_steps, config.decay_at,
                           config.decay_factor)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tokens, mask, epoch, index = self.dataset.train_batch(self.position.epoch, self.position.index,
                                                             config.batch_size)
        self.position.epoch, self.position.index = epoch, index
        targets_total = int(mask.sum())  # every rank sees the global batch: no communication needed
        share = config.batch_size // ranks
        tokens, mask = tokens[rank * share:(rank + 1) * share], mask[rank * share:(rank + 1) * share]
        self.optimizer.zero_grad(set_to_none=True)
        ce_sum = balance = 0.0
        loads = None
        drops = [0, 0]  # assignments dropped, received (device-level token dropping)
        micro = config.micro_batch_size
        for first in range(0, share, micro):
            x = tokens[first:first + micro].to(self.device)  # [b, L + 1]
            m = mask[first:first + micro].to(self.device)  # [b, L]
            if not bool(m[:, -1].any()):  # padded rows (SFT): drop the columns after the last target
                width = int(m.any(dim=0).nonzero().max()) + 1 if bool(m.any()) else 1
                x, m = x[:, : width + 1], m[:, :width]
            dropping = config.token_drop_capacity is not None
            protected = self._protected_rows(rank * share + first, x.shape[0])[:, None].expand(-1, m.shape[1]) \
                if dropping else None
            sync = first + micro >= share  # DDP all-reduces on the last micro-batch only
            context = contextlib.nullcontext() if sync or not isinstance(
                self.train_model, nn.parallel.DistributedDataParallel) else self.train_model.no_sync()
            with context:
                # weighted so that the average over ranks of the summed micro-batch gradients is the global mean
                with self._autocast(), protected_tokens(self.model, protected), balance_over(self.model, counted(m)):
                    out = self.train_model(x[:, :-1], targets=x[:, 1:], target_weights=m * (ranks / targets_total),
                                           return_aux=True)
                if dropping:
                    drops = [a + b for a, b in zip(drops, dropped_counts(self.model), strict=True)]
                ce_sum_micro = (out.token_loss * m).sum()
                (out.loss + out.aux_loss * (micro / config.batch_size * ranks)).backward()
            ce_sum += ce_sum_micro.item()
            balance += out.aux_loss.item() * micro / config.batch_size
            loads = out.expert_load if loads is None else loads + out.expert_load
        if self.expert_params:  # their gradients gathered every rank's contribution: average, as DDP does
            params = dict(self.model.named_parameters())
            for name in self.expert_params:
                if params[name].grad is not None:
                    params[name].grad /= ranks
        stats = torch.tensor([ce_sum, balance], device=self.device, dtype=torch.float64)
        if self.dist.enabled:
            torch.distributed.all_reduce(stats)
        loss = stats[0].item() / targets_total
        grad_norm = self._clip()
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        record = {"loss": loss if finite else float("nan"), "balance_loss": stats[1].item(), "lr": lr,
                  "grad_norm": grad_norm, "tokens": config.batch_size * config.seq_len}
        if loads is not None and loads.numel():
            if self.dist.enabled:
                torch.distributed.all_reduce(loads)
            record["expert_load"] = (loads / loads.sum(dim=-1, keepdim=True)).tolist()
        if config.token_drop_capacity is not None:
            counts = torch.tensor(drops, device=self.device, dtype=torch.float64)
            torch.distributed.all_reduce(counts)
            record["dropped_fraction"] = counts[0].item() / max(counts[1].item(), 1.0)
        return record

    def _protected_rows(self, first: int, count: int) -> torch.Tensor:
        """[count] bool: which of the global batch's rows first .. first + count - 1 device-level token dropping
        never drops: an evenly spaced share ``token_drop_protected`` of them (row g when ⌊(g + 1)·f⌋ > ⌊g·f⌋)."""
        f = self.config.token_drop_protected
        rows = torch.arange(first, first + count, device=self.device, dtype=torch.float64)
        return torch.floor((rows + 1) * f) > torch.floor(rows * f)

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.expert_params and self.dist.enabled:  # the norm must cover every rank's experts
            from torch.distributed.tensor import DTensor

            # squares of what each rank holds alone (its experts, its FSDP shards: summed over ranks) and of what
            # every rank holds alike (DDP's replicated gradients: counted once)
            expert = {id(p) for n, p in self.model.named_parameters() if n in self.expert_params}
            squares = {True: [], False: []}  # split over ranks or not
            for p in params:
                split = id(p) in expert or isinstance(p.grad, DTensor)
                grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                squares[split].append(grad.float().square().sum())
            split, replicated = (torch.stack(squares[k]).sum() if squares[k] else torch.zeros((), device=self.device)
                                 for k in (True, False))
            torch.distributed.all_reduce(split)
            total = (split + replicated).sqrt().item()
            scale = min(1.0, self.config.grad_clip / (total + 1e-6))
            for p in params:
                p.grad.mul_(scale)
            return total
        return nn.utils.clip_grad_norm_(params, self.config.grad_clip).item()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation cross-entropy over (up to) ``eval_sequences`` held-out sequences."""
        self.model.eval()
        ce_sum, count = 0.0, 0
        for tokens, mask in self.dataset.val_batches(self.config.micro_batch_size, self.config.eval_sequences):
            x, m = tokens.to(self.device), mask.to(self.device)
            with self._autocast():
                ce = self.train_model(x[:, :-1], targets=x[:, 1:], return_aux=False).token_loss
            ce_sum += (ce * m).sum().item()
            count += int(m.sum())
        self.model.train()
        if not count:
            return {}
        return {"val_loss": ce_sum / count, "unigram_entropy": self.dataset.unigram_entropy()}

    # --------------------------------------------------------------------------------------------- checkpoints
    def _full_model(self) -> DeepseekV2ForCausalLM | None:
        """A model with the complete weights (experts gathered from every rank) for saving, which only rank 0 uses:
        every rank takes part in the gather, but where a new model would have to be built, the others get None."""
        if not self.expert_params and self.config.data_parallel != "fsdp":
            return self.model
        if self.config.data_parallel == "fsdp" and self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
            if self.expert_params:  # FSDP left the experts alone: gather every rank's slice
                state = {k: v for k, v in state.items() if k not in self.expert_params}
                state.update(gather_experts(self.model, self.dist.world_size))
        else:
            state = {k: v for k, v in self.model.state_dict().items() if k not in self.expert_params}
            state.update(gather_experts(self.model, self.dist.world_size))
        if not self.dist.is_main:
            return None
        full = DeepseekV2ForCausalLM.empty(self.model_config, torch.float32, "cpu")
        full.load_state_dict({k: v.cpu() for k, v in state.items()})
        return full

    def save(self) -> None:
        """A checkpoint of the current step: rank 0 writes the model and the trainer state, every rank its
        optimizer and random state, all into a staging folder that rank 0 then renames into place."""
        full = self._full_model()
        staging = staging_dir(self.out, self.position.step)
        if self.dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.dist.barrier()
        torch.save({"optimizer": _local_tensors(self.optimizer.state_dict()), "rng": torch.get_rng_state()},
                   rank_file(staging, self.dist.rank))
        self.dist.barrier()
        if self.dist.is_main:
            full.save_pretrained(staging, dtype=torch.float32)  # master weights, exact for resuming
            copy_tokenizer(self.tokenizer_dir, staging)
            torch.save({"position": vars(self.position).copy(), "world_size": self.dist.world_size,
                        "expert_parallel": self.config.expert_parallel, "config": self.config.to_dict()},
                       staging / STATE_FILE)
            log.info("saved %s", commit(self.out, staging, self.position.step, self.config.keep_last))
        self.dist.barrier()

    def export(self) -> None:
        """The final model as a plain model folder (OUT/model) in ``export_dtype``, with the tokenizer."""
        full = self._full_model()
        if self.dist.is_main:
            target = self.out / "model"
            full.save_pretrained(target, dtype=parse_dtype(self.config.export_dtype))
            copy_tokenizer(self.tokenizer_dir, target)
        self.dist.barrier()


def counted(mask: torch.Tensor) -> torch.Tensor:
    """[b, L] bool: the input positions of a micro-batch that the balance loss counts: up to each row's last target
    (a row trimmed on its own would end there), not the padding after it."""
    return mask.flip(1).cummax(1).values.flip(1)


def _local_tensors(state):
    """An optimizer state with every DTensor (FSDP2's sharded parameters) replaced by this rank's local shard."""
    if isinstance(state, dict):
        return {k: _local_tensors(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_local_tensors(v) for v in state]
    return state.to_local() if hasattr(state, "to_local") else state


def _as_parameters(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of `_local_tensors` for a loaded optimizer state: shards become DTensors like their parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, per_param in state["state"].items():
        param = params[int(index)]
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import DTensor

            for key, value in per_param.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    per_param[key] = DTensor.from_local(value, param.device_mesh, param.placements)
    return state


def run_training(config: TrainConfig) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        trainer.dist.close()
