"""Device-level token dropping (expert parallel training): which assignments a rank keeps, what the layer computes
with the others dropped over 2 gloo ranks, and a training run with it."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv2.model.moe import RoutedExperts
from dsv2.parallel.expert_parallel import (
    ExpertParallelExperts,
    dropped_counts,
    keep_within_capacity,
    protected_tokens,
    set_token_dropping,
)
from dsv2.train.config import TrainConfig

from helpers import free_port
from test_train import corpus  # noqa: F401  (the fixture)
from test_train_distributed import _rank, settings


def test_keep_the_protected_then_the_highest_affinity_up_to_capacity():
    affinity = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3, 0.7])
    none = torch.zeros(6, dtype=torch.bool)
    assert keep_within_capacity(affinity, none, 6).all()  # within capacity: nothing dropped
    assert keep_within_capacity(affinity, none, 3).tolist() == [False, True, False, True, False, True]
    assert keep_within_capacity(affinity, none, 2).tolist() == [False, True, False, True, False, False]  # tie: first
    protected = torch.tensor([False, False, True, False, True, False])
    assert keep_within_capacity(affinity, protected, 3).tolist() == [False, True, True, False, True, False]
    assert keep_within_capacity(affinity, protected, 1).tolist() == [False, False, True, False, True, False]


E, H, INNER, N, K = 4, 16, 8, 6, 2  # experts (2 per rank), hidden, intermediate, tokens per rank, per token


def _inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank r's tokens: every assignment goes to rank 0's experts (0 and 1), with distinct affinities."""
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(N, H, generator=gen)
    ids = torch.stack([torch.randint(0, 2, (N,), generator=gen), torch.full((N,), -1)], dim=1)
    ids[:, 1] = 1 - ids[:, 0]  # the two distinct experts of rank 0
    weights = torch.rand(N, K, generator=gen) + 0.01 * (rank * N * K + torch.arange(N * K).view(N, K))
    return x, ids, weights


def _dropping_rank(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    full = RoutedExperts(E, H, INNER)
    for p in full.parameters():
        torch.nn.init.normal_(p, std=0.5)
    layer = ExpertParallelExperts(full, rank, world).train()
    set_token_dropping(layer, 1.0)
    x, ids, weights = _inputs(rank)
    protected = torch.zeros(1, N, dtype=torch.bool)
    protected[0, 0] = rank == 1  # rank 1's first token: never dropped

    # every rank's assignments, to work out the expected choice: capacity = 1.0 × 24 / 2 = 12 of the 24 that rank 0
    # receives; rank 1's token 0 (2 assignments) is protected, then the 10 highest affinities
    everyone = [_inputs(r) for r in range(world)]
    affinity = torch.cat([w.flatten() for _, _, w in everyone])  # [24]
    flags = torch.zeros(2 * N * K, dtype=torch.bool)
    flags[N * K: N * K + K] = True
    kept = keep_within_capacity(affinity, flags, 12).view(world, N, K)
    assert int(kept.sum()) == 12 and kept[1, 0].all()

    with protected_tokens(layer, protected):
        got = layer(x, ids, weights)
    want = full(x, ids, weights * kept[rank])  # a dropped assignment adds nothing
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert dropped_counts(layer) == ((12, 24) if rank == 0 else (0, 0))
    got.square().sum().backward()  # gradients flow through the kept assignments
    assert layer.gate_proj.grad is not None
    with torch.no_grad():  # inference never drops
        torch.testing.assert_close(layer(x, ids, weights), full(x, ids, weights), atol=1e-5, rtol=1e-5)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_drop_the_lowest_affinity_assignments_over_capacity():
    mp.spawn(_dropping_rank, args=(2, free_port()), nprocs=2, join=True)


@pytest.mark.distributed
def test_training_with_token_dropping(corpus, tmp_path):  # noqa: F811
    """Capacity 1.0 drops some assignments of the untrained router and trains on; capacity 2.0 over 2 ranks (every
    assignment fits) is the run without dropping, loss for loss."""
    runs = {}
    for name, capacity in (("dropping", 1.0), ("roomy", 2.0), ("off", None)):
        config = settings(corpus, tmp_path / name, expert_parallel=2, token_drop_capacity=capacity)
        mp.spawn(_rank, args=(2, free_port(), config), nprocs=2, join=True)
        records = map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
        runs[name] = [r for r in records if "loss" in r]  # the training steps' records
    dropped = [r["dropped_fraction"] for r in runs["dropping"]]
    assert len(dropped) == 5 and all(0 <= f < 0.5 for f in dropped) and any(f > 0 for f in dropped), dropped
    assert all(r["loss"] is not None for r in runs["dropping"])
    assert [r["dropped_fraction"] for r in runs["roomy"]] == [0.0] * 5
    assert [r["loss"] for r in runs["roomy"]] == [r["loss"] for r in runs["off"]]
    with pytest.raises(ValueError, match="token dropping needs expert_parallel >= 2"):
        TrainConfig.load(None, data="x", steps=1, token_drop_capacity=1.0)
