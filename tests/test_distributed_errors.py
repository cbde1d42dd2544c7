"""Bad parallel settings give one clear error naming the setting, before any rank starts or any work is done."""

import subprocess
import sys

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv2 import LLM
from dsv2.train.parallel import Distributed
from dsv2.train.trainer import Trainer

from helpers import TINY_V2, tiny_checkpoint
from test_train import TINY, config, corpus  # noqa: F401  (corpus: the fixture)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), TINY_V2)  # 4 heads, 16 routed experts, vocabulary 512


@pytest.mark.parametrize(("layout", "message"), [
    ({"tensor_parallel_size": 3}, "tensor_parallel_size=3: vocab_size = 512 cannot be split evenly over 3 ranks"),
    ({"tensor_parallel_size": 8}, "tensor_parallel_size=8: num_attention_heads = 4 cannot be split evenly"),
    ({"data_parallel_size": 3, "enable_expert_parallel": True},
     "data_parallel_size=3: n_routed_experts = 16 cannot be split evenly over 3 ranks"),
], ids=["vocabulary", "heads", "experts"])
def test_a_model_that_does_not_split_over_the_ranks_is_refused_before_any_starts(checkpoint, layout, message,
                                                                                  monkeypatch):
    def no_workers(*args, **kwargs):
        raise AssertionError("a worker process was started")

    monkeypatch.setattr(mp.get_context("spawn"), "Process", no_workers)
    with pytest.raises(ValueError, match=message):
        LLM(model=checkpoint, kv_cache_memory=4_000_000, dtype="float32", **layout)
    assert not dist.is_initialized()


def test_expert_parallel_training_of_a_model_without_moe_layers_is_refused(corpus, tmp_path):  # noqa: F811
    dense = config(corpus, tmp_path / "run", expert_parallel=2, model_overrides={**TINY, "first_k_dense_replace": 2})
    with pytest.raises(ValueError, match="expert_parallel=2: the model has no MoE layers"):
        Trainer(dense, Distributed(rank=0, world_size=2))


def test_expert_parallel_training_over_ranks_that_do_not_divide_the_experts_is_refused(corpus, tmp_path):  # noqa: F811
    uneven = config(corpus, tmp_path / "run", expert_parallel=3, batch_size=6)
    with pytest.raises(ValueError, match="expert_parallel=3: the model's n_routed_experts = 8 cannot be split evenly"):
        Trainer(uneven, Distributed(rank=0, world_size=3))


def test_resuming_on_another_number_of_ranks_names_the_layout_not_a_missing_file(corpus, tmp_path):  # noqa: F811
    """A rank that the checkpoint has no file for must not tell the user to delete a good checkpoint."""
    Trainer(config(corpus, tmp_path / "run", steps=2, save_every=2, eval_every=2)).train()
    for rank in (0, 1):
        with pytest.raises(ValueError, match=r"written by 1 rank\(s\) with expert_parallel=1; resume it with the same "
                                             "layout"):
            Trainer(config(corpus, tmp_path / "run", steps=4), Distributed(rank=rank, world_size=2, local_rank=rank))


def test_a_parallel_llm_left_open_stops_its_workers_cleanly_at_exit(checkpoint, tmp_path):
    """Workers of an LLM still open at exit get the stop message before multiprocessing terminates them: terminated,
    a worker ran no finalizers, and Python reported its semaphores (tqdm's lock) leaked."""
    script = tmp_path / "left_open.py"
    script.write_text("from dsv2 import LLM, SamplingParams\n"
                      "if __name__ == '__main__':\n"
                      f"    llm = LLM(model={str(checkpoint)!r}, tensor_parallel_size=2, kv_cache_memory=4_000_000,"
                      " dtype='float32')\n"
                      "    out = llm.generate({'prompt_token_ids': [1, 2, 3]}, SamplingParams(max_tokens=2))\n"
                      "    print(len(out[0].outputs[0].token_ids))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "2", done.stderr
    assert "leaked" not in done.stderr, done.stderr
