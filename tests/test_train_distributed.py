"""2 ranks (gloo, CPU) against 1: data parallel (DDP, FSDP2) and expert parallel give the same losses."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from dsv2 import DeepseekV2ForCausalLM
from dsv2.train.config import TrainConfig
from dsv2.train.trainer import Trainer, build_model, fully_shard_model

from helpers import free_port
from test_train import TINY, corpus, losses  # noqa: F401  (corpus: the fixture)

pytestmark = pytest.mark.distributed


def settings(corpus_dir, out, **changes):
    base = dict(model="nano", model_overrides=TINY, tokenizer=str(corpus_dir), data=str(corpus_dir / "data/train.bin"),
                seq_len=32, batch_size=8, micro_batch_size=2, steps=5, warmup_steps=2, lr=2e-3, out=str(out),
                save_every=5, eval_every=5, log_every=1, eval_sequences=4, val_fraction=0.1, precision="float32",
                device_balance_alpha=0.0)
    return {**base, **changes}


def _refuse_full_models_off_rank_0(rank: int) -> None:
    """Saving gathers the model for rank 0 alone: another rank building one (63 GB in fp32 for V2-Lite) fails."""
    if rank == 0:
        return

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"rank {rank} built a whole model to save a checkpoint")

    DeepseekV2ForCausalLM.empty = classmethod(refuse)  # this rank's process only; after its trainer is built


def _rank(rank: int, world: int, port: int, config: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig.load(None, **config))
    _refuse_full_models_off_rank_0(rank)
    try:
        trainer.train()
    finally:
        trainer.dist.close()


@pytest.mark.parametrize("layout", [{"data_parallel": "ddp"}, {"data_parallel": "fsdp"},
                                    {"data_parallel": "ddp", "expert_parallel": 2},
                                    {"data_parallel": "ddp", "expert_parallel": 2, "device_limit": 1,
                                     "device_balance_alpha": 0.05, "comm_balance_alpha": 0.02},
                                    {"data_parallel": "fsdp", "expert_parallel": 2}],
                         ids=["ddp", "fsdp", "expert-parallel", "expert-parallel-device-limited",
                              "fsdp-expert-parallel"])
def test_two_ranks_match_one(corpus, tmp_path, layout):  # noqa: F811
    device_level = ("expert_parallel", "device_limit", "device_balance_alpha", "comm_balance_alpha")
    single_layout = {k: v for k, v in layout.items() if k not in device_level}  # one rank: none of these apply
    one = Trainer(TrainConfig.load(None, **settings(corpus, tmp_path / "one", **single_layout)))
    if "device_limit" in layout:  # the same routing and losses on one rank: 2 device groups of 4 experts
        from dsv2.train.losses import add_device_balance_losses, limit_devices

        limit_devices(one.model, 2, 1)
        add_device_balance_losses(one.model, 2, 1, 0.05, 0.02)
    one.train()
    mp.spawn(_rank, args=(2, free_port(), settings(corpus, tmp_path / "two", **layout)), nprocs=2, join=True)
    expected, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(got) == 5
    assert max(abs(a - b) for a, b in zip(expected, got, strict=True)) <= 1e-5, (expected, got)
    # the 2-rank run's checkpoint holds the complete model (every rank's experts) in the official layout
    a = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "one" / "model", dtype=torch.float32)
    b = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "two" / "model", dtype=torch.float32)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=2e-2), name  # bf16 exports of weights trained 5 steps apart by rounding


@pytest.mark.parametrize("data_parallel", ["ddp", "fsdp"])
def test_expert_parallel_under_bf16_autocast_matches_one_rank(corpus, tmp_path, data_parallel):  # noqa: F811
    """The default precision (bf16 autocast over float32 weights): the experts' outputs travel back in bf16."""
    one = Trainer(TrainConfig.load(None, **settings(corpus, tmp_path / "one", precision="bfloat16",
                                                    data_parallel=data_parallel)))
    one.train()
    two = settings(corpus, tmp_path / "two", precision="bfloat16", data_parallel=data_parallel, expert_parallel=2)
    mp.spawn(_rank, args=(2, free_port(), two), nprocs=2, join=True)
    expected, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(got) == 5
    assert max(abs(a - b) / a for a, b in zip(expected, got, strict=True)) <= 2e-2, (expected, got)


class _Crash(Exception):
    pass


def _rank_crashing_after(rank: int, world: int, port: int, config: dict, crash_step: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig.load(None, **config))
    _refuse_full_models_off_rank_0(rank)
    save = trainer.save

    def save_then_crash():
        save()
        if trainer.position.step == crash_step:
            raise _Crash

    trainer.save = save_then_crash
    try:
        trainer.train()
    except _Crash:
        pass
    finally:
        trainer.dist.close()


@pytest.mark.parametrize("layout", [{"data_parallel": "fsdp"}, {"data_parallel": "ddp", "expert_parallel": 2},
                                    {"data_parallel": "fsdp", "expert_parallel": 2}],
                         ids=["fsdp", "expert-parallel", "fsdp-expert-parallel"])
def test_two_rank_resume_reproduces_the_uninterrupted_run(corpus, tmp_path, layout):  # noqa: F811
    straight = settings(corpus, tmp_path / "straight", steps=6, save_every=3, **layout)
    mp.spawn(_rank, args=(2, free_port(), straight), nprocs=2, join=True)
    resumed = settings(corpus, tmp_path / "resumed", steps=6, save_every=3, **layout)
    mp.spawn(_rank_crashing_after, args=(2, free_port(), resumed, 3), nprocs=2, join=True)
    assert len(losses(tmp_path / "resumed")) == 3
    mp.spawn(_rank, args=(2, free_port(), resumed), nprocs=2, join=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def _rank_loading_only_its_experts(rank: int, world: int, port: int, config: dict) -> None:
    """A rank whose trainer may not read a checkpoint whole (with expert parallelism it reads its own experts)."""
    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"rank {rank} loaded a whole checkpoint")

    DeepseekV2ForCausalLM.from_pretrained = classmethod(refuse)
    _rank(rank, world, port, config)


def test_expert_parallel_training_from_a_checkpoint_loads_each_ranks_experts(corpus, tmp_path):  # noqa: F811
    """Fine-tuning a checkpoint with expert parallelism: every rank loads only its own routed experts (V2-Lite over 8
    ranks: ~12 GB in float32, the dense ~5 GB and 1/8 of the experts' ~58 GB, instead of ~63 GB), and the losses are
    the 1-rank run's; a resume does the same."""
    Trainer(TrainConfig.load(None, **settings(corpus, tmp_path / "base", steps=2))).train()
    start = dict(model=str(tmp_path / "base" / "model"), model_overrides={})
    one = Trainer(TrainConfig.load(None, **settings(corpus, tmp_path / "one", **start)))
    one.train()
    two = settings(corpus, tmp_path / "two", expert_parallel=2, **start)
    mp.spawn(_rank_loading_only_its_experts, args=(2, free_port(), two), nprocs=2, join=True)
    expected, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(got) == 5 and max(abs(a - b) for a, b in zip(expected, got, strict=True)) <= 1e-5, (expected, got)
    longer = settings(corpus, tmp_path / "two", expert_parallel=2, **{**start, "steps": 6})  # resumes from step 5
    mp.spawn(_rank_loading_only_its_experts, args=(2, free_port(), longer), nprocs=2, join=True)
    assert len(losses(tmp_path / "two")) == 6


def _rank_building_a_sharded_preset(rank: int, world: int, port: int, config: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = build_model(TrainConfig.load(None, **config), torch.device("cpu"), rank, world,
                            shard=fully_shard_model)
        whole = {name: p.full_tensor() for name, p in model.named_parameters()}  # every rank takes part
        if rank == 0:
            torch.save((whole, model.lm_head.weight is model.model.embed_tokens.weight), out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp_shards_of_a_preset_over_3_ranks_hold_the_whole_models_values(corpus, tmp_path, tied):  # noqa: F811
    """FSDP applied on the meta device, then drawn: over 3 ranks (uneven shards: 8 experts as 3/3/2, a vocabulary of
    515 rows) the gathered parameters equal the 1-rank model's bit for bit, and a tied head stays tied."""
    config = settings(corpus, tmp_path / "run", data_parallel="fsdp",
                      model_overrides={**TINY, "vocab_size": 515, "tie_word_embeddings": tied})
    mp.spawn(_rank_building_a_sharded_preset, args=(3, free_port(), config, str(tmp_path / "whole.pt")), nprocs=3,
             join=True)
    gathered, still_tied = torch.load(tmp_path / "whole.pt")
    one = build_model(TrainConfig.load(None, **config), torch.device("cpu"))
    expected = dict(one.named_parameters())
    assert gathered.keys() == expected.keys() and still_tied == tied
    for name, tensor in expected.items():
        assert torch.equal(gathered[name], tensor.detach()), name
