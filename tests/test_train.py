"""Training: the schedule, the optimizer groups, data, checkpoints and resume, non-finite losses, SFT masks, and
2 ranks against 1 (data and expert parallel, gloo)."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv2 import DeepseekV2ForCausalLM, ModelConfig, Tokenizer
from dsv2.model.moe import Routing
from dsv2.train.checkpoint import checkpoint_dirs, latest_checkpoint
from dsv2.train.config import TrainConfig
from dsv2.train.data import PackedDataset, TokenFile, tokenize_files
from dsv2.train.losses import device_balance_losses
from dsv2.train.metrics import MetricsLog
from dsv2.train.optim import learning_rate, make_optimizer, parameter_groups
from dsv2.train.sft import ChatDataset, encode_conversation
from dsv2.train.trainer import Trainer, TrainingInterrupted, TrainingStopped, build_model

from helpers import TRAIN_TINY as TINY
from helpers import make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def config(corpus, out, **changes):
    settings = dict(model="nano", model_overrides=TINY, tokenizer=str(corpus), data=str(corpus / "data/train.bin"),
                    seq_len=32, batch_size=4, micro_batch_size=2, steps=6, warmup_steps=2, lr=2e-3,
                    out=str(out), save_every=3, eval_every=3, log_every=1, eval_sequences=4, val_fraction=0.1,
                    precision="float32")
    settings.update(changes)
    return TrainConfig.load(None, **settings)


def losses(out):
    return [r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# ---------------------------------------------------------------------------------------------------- the recipe
def test_schedule_values():
    lr, total, warm = 4.2e-4, 10_000, 2000
    assert learning_rate(0, total, lr, warm) == pytest.approx(lr / warm)
    assert learning_rate(999, total, lr, warm) == pytest.approx(lr / 2)
    assert learning_rate(1999, total, lr, warm) == pytest.approx(lr)
    assert learning_rate(7999, total, lr, warm) == pytest.approx(lr)  # until 80% of training
    assert learning_rate(8000, total, lr, warm) == pytest.approx(lr * 0.316)
    assert learning_rate(8999, total, lr, warm) == pytest.approx(lr * 0.316)
    assert learning_rate(9000, total, lr, warm) == pytest.approx(lr * 0.316**2)
    assert learning_rate(9999, total, lr, warm) == pytest.approx(lr * 0.316**2)  # the end
    assert learning_rate(6000, total, 2.4e-4, warm, decay_at=(0.6, 0.9)) == pytest.approx(2.4e-4 * 0.316)  # V2


def test_weight_decay_skips_norms_and_biases():
    with_bias = ModelConfig.from_dict({**ModelConfig.preset("nano").to_dict(), **TINY, "attention_bias": True})
    model = DeepseekV2ForCausalLM.from_config(with_bias)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    skipped = {names[id(p)] for p in no_decay["params"]}
    norms_and_biases = {n for n in names.values() if n.endswith("norm.weight") or n.endswith(".bias")}
    assert any(n.endswith(".bias") for n in norms_and_biases)  # the config has biases to skip
    assert skipped == norms_and_biases  # every norm and bias, and nothing else, goes without weight decay
    assert any(names[id(p)].endswith("mlp.gate.weight") for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_device_and_communication_losses_follow_the_papers_formulas():
    """α2 Σ_i f′_i P′_i and α3 Σ_i f″_i P″_i (reference section 5), written out with loops, per sequence and
    averaged over the batch."""
    B, T, E, k, D, M = 2, 5, 8, 3, 4, 2
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(B * T, E, generator=gen).softmax(dim=-1)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(B * T)])  # [B·T, k] distinct experts
    routing = Routing(scores, ids, torch.ones(B * T, k))
    per_device = E // D
    want_device = want_comm = 0.0
    for b in range(B):
        rows = range(b * T, (b + 1) * T)
        f = [E / (k * T) * sum(int(j in ids[t].tolist()) for t in rows) for j in range(E)]
        P = [sum(float(scores[t, j]) for t in rows) / T for j in range(E)]
        for i in range(D):
            experts = range(i * per_device, (i + 1) * per_device)
            f_dev = sum(f[j] for j in experts) / per_device
            P_dev = sum(P[j] for j in experts)
            sent = sum(any(int(j) // per_device == i for j in ids[t]) for t in rows)
            want_device += f_dev * P_dev / B
            want_comm += D / (M * T) * sent * P_dev / B
    got = device_balance_losses(routing, B, T, D, M, device_alpha=0.05, comm_alpha=0.02)
    assert got.item() == pytest.approx(0.05 * want_device + 0.02 * want_comm, rel=1e-5)
    alone = device_balance_losses(routing, B, T, D, M, device_alpha=1.0, comm_alpha=0.0)
    assert alone.item() == pytest.approx(want_device, rel=1e-5)
    with pytest.raises(ValueError, match=r"device_limit = 2: .* need expert_parallel >= 2"):
        TrainConfig.load(None, data="x", steps=1, device_limit=2)  # one rank: device-level settings do nothing


def test_fused_optimizer_steps_like_the_plain_one():
    model = DeepseekV2ForCausalLM.from_config(ModelConfig.from_dict({**ModelConfig.preset("nano").to_dict(), **TINY}))
    twin = copy.deepcopy(model)
    fused = make_optimizer(model, lr=1e-2)
    plain = torch.optim.AdamW(parameter_groups(twin, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    for _ in range(3):
        for m, optimizer in ((model, fused), (twin, plain)):
            optimizer.zero_grad()
            m(x).logits.square().mean().backward()
            optimizer.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_a_sharded_preset_is_allocated_only_as_its_shards_with_the_whole_models_values(corpus, tmp_path,
                                                                                      monkeypatch):
    """A preset is built on the meta device, its experts sharded (expert parallelism) and FSDP applied before
    anything is allocated: rank 1 of 2 draws the values of experts 4-7 only, and they equal the 1-rank model's
    experts 4-7 (FSDP's shards against 1 rank: tests/test_train_distributed.py)."""
    import dsv2.model.transformer as transformer

    drawn = {}
    draw = transformer._seeded_normal_
    monkeypatch.setattr(transformer, "_seeded_normal_", lambda param, *args: (
        drawn.__setitem__(args[2], tuple(param.shape)), draw(param, *args)))
    whole = build_model(config(corpus, tmp_path / "one"), torch.device("cpu"))
    assert drawn["model.layers.1.mlp.experts.gate_proj"] == (8, 32, 64)
    drawn.clear()
    rank_1 = build_model(config(corpus, tmp_path / "two", expert_parallel=2), torch.device("cpu"), rank=1,
                         world_size=2)
    assert drawn["model.layers.1.mlp.experts.gate_proj"] == (4, 32, 64)  # never the whole stack
    whole_state, rank_state = whole.state_dict(), rank_1.state_dict()
    assert whole_state.keys() == rank_state.keys()
    for name, tensor in rank_state.items():
        expected = whole_state[name][4:] if ".mlp.experts." in name else whole_state[name]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=name)
    sharded_on = []  # FSDP's fully_shard (here a stand-in) gets the model before anything is allocated
    build_model(config(corpus, tmp_path / "four"), torch.device("cpu"),
                shard=lambda model: sharded_on.append({p.device.type for p in model.parameters()}))
    assert sharded_on == [{"meta"}]
    std = whole_state["model.layers.0.self_attn.q_proj.weight"].std().item()
    assert abs(std - 0.006) < 0.001 and (whole_state["model.norm.weight"] == 1).all()
    reseeded = build_model(config(corpus, tmp_path / "three", seed=1), torch.device("cpu"))
    assert not torch.equal(reseeded.model.embed_tokens.weight, whole.model.embed_tokens.weight)


def test_data_packing_order_and_split(corpus):
    data = TokenFile.open(corpus / "data/train.bin")
    assert len(data.document_offsets) == 30 and int(data.tokens[data.document_offsets[1] - 1]) == data.eos_token_id
    ds = PackedDataset(data, seq_len=16, val_fraction=0.1, seed=3)
    assert len(ds.val_tokens) == len(data.tokens) - data.document_offsets[27]  # the last 3 documents
    a, mask, epoch, index = ds.train_batch(0, 0, 5)
    b, _, _, _ = ds.train_batch(0, 0, 5)
    assert torch.equal(a, b) and a.shape == (5, 17) and mask.all() and (epoch, index) == (0, 5)
    _, _, epoch, index = ds.train_batch(0, 0, ds.num_train + 2)  # wraps into the next epoch
    assert (epoch, index) == (1, 2)
    assert sorted(ds.order(0).tolist()) == list(range(ds.num_train)) and not torch.equal(ds.order(0), ds.order(1))
    assert 0 < ds.unigram_entropy() < 7


def test_a_single_text_file_still_gets_a_validation_split(tmp_path):
    """One document (a .txt file): the last val_fraction of its tokens is held out, at least one sequence."""
    tokens = np.arange(1000, dtype=np.uint32)
    one_document = TokenFile(tokens, [0], eos_token_id=1)
    ds = PackedDataset(one_document, seq_len=16, val_fraction=0.05)
    assert len(ds.val_tokens) == 50 and ds.num_val == 3 and np.array_equal(ds.val_tokens, tokens[-50:])
    assert len(ds.train_tokens) + len(ds.val_tokens) == 1000
    tiny_share = PackedDataset(one_document, seq_len=100, val_fraction=0.01)  # 10 tokens: one sequence instead
    assert len(tiny_share.val_tokens) == 101 and tiny_share.num_val == 1
    short_docs = TokenFile(tokens, [0, 990, 995], eos_token_id=1)  # the held-out documents are too short
    assert PackedDataset(short_docs, seq_len=16, val_fraction=0.34).num_val >= 1
    assert PackedDataset(one_document, seq_len=16, val_fraction=0).num_val == 0
    assert PackedDataset(TokenFile(tokens[:20], [0], 1), seq_len=16).num_val == 0  # too small for both: all trains


def copy_token_file(corpus, folder, **index_changes):
    """The corpus's token file in ``folder`` (train.bin), its index's fields changed (None: removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(corpus / "data/train.bin", folder / "train.bin")
    index = json.loads((corpus / "data/train.idx.json").read_text())
    index.update(index_changes)
    (folder / "train.idx.json").write_text(json.dumps({k: v for k, v in index.items() if v is not None}))
    return folder / "train.bin"


def test_data_from_a_larger_vocabulary_is_refused_before_the_model_is_built(corpus, tmp_path, monkeypatch):
    import dsv2.train.trainer

    index = json.loads((corpus / "data/train.idx.json").read_text())
    assert index["vocab_size"] == 400 and 300 < index["max_token_id"] < 400
    assert index["tokenizer"] == str(corpus.resolve())
    monkeypatch.setattr(dsv2.train.trainer, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    small = {**TINY, "vocab_size": 300}
    with pytest.raises(ValueError, match=rf"train.bin \(its index .*train.idx.json\) holds token id "
                                         rf"{index['max_token_id']}, but the model \(preset nano\) has vocab_size "
                                         r"300: tokenize the data with the model's tokenizer, or set "
                                         r"model_overrides' vocab_size to 400 or more"):
        Trainer(config(corpus, tmp_path, model_overrides=small))
    old_index = copy_token_file(corpus, tmp_path / "old", max_token_id=None)  # written before max_token_id was
    with pytest.raises(ValueError, match=rf"was tokenized with {corpus.resolve()}, of 400 ids, but the model"):
        Trainer(config(corpus, tmp_path, model_overrides=small, data=str(old_index)))
    with pytest.raises(ValueError, match=r"model \(.*config.json\) has vocab_size 300: tokenize the data with the "
                                         r"model's tokenizer$"):
        small_model = tmp_path / "small"
        DeepseekV2ForCausalLM.from_config(ModelConfig.from_dict({**ModelConfig.preset("nano").to_dict(), **small})
                                          ).save_pretrained(small_model)
        Trainer(config(corpus, tmp_path, model=str(small_model), model_overrides={}))


def test_a_preset_run_takes_the_token_files_tokenizer_and_exports_in_an_aliased_dtype(corpus, tmp_path, caplog):
    Trainer(config(corpus, tmp_path / "run", tokenizer=None, steps=1, export_dtype="fp16")).train()
    model = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "run/model")
    assert model.tokenizer is not None and model.dtype == torch.float16
    gone = copy_token_file(corpus, tmp_path / "moved", tokenizer=str(tmp_path / "deleted-tokenizer"))
    Trainer(config(corpus, tmp_path / "run2", tokenizer=None, data=str(gone), steps=1)).train()
    assert f"the tokenizer {tmp_path / 'deleted-tokenizer'} that {gone} was made with no longer exists: " \
           f"{tmp_path / 'run2'}/model will have no tokenizer files" in caplog.text
    assert not (tmp_path / "run2/model/tokenizer.json").exists()


def test_a_malformed_token_index_is_named(corpus, tmp_path):
    data = copy_token_file(corpus, tmp_path)
    (tmp_path / "train.idx.json").write_text("{garbage")
    with pytest.raises(ValueError, match=r"train\.idx\.json: not valid JSON"):
        TokenFile.open(data)
    copy_token_file(corpus, tmp_path, num_tokens="many")
    with pytest.raises(ValueError, match=r"train\.idx\.json: field 'num_tokens' = 'many': expected an integer"):
        TokenFile.open(data)
    copy_token_file(corpus, tmp_path, document_offsets=None)
    with pytest.raises(ValueError, match=r"field 'document_offsets' = None: expected a list of integers"):
        TokenFile.open(data)


def test_tokenize_names_bad_input_before_the_work_and_leaves_no_partial_files(corpus, tmp_path):
    out = tmp_path / "out" / "train.bin"
    good = corpus / "doc00.txt"
    out.parent.mkdir()
    with pytest.raises(ValueError, match=r"out: is a folder; --output names the \.bin file"):
        tokenize_files(corpus, [good], tmp_path / "out", workers=1)
    with pytest.raises(ValueError, match="workers = -1: the number of tokenizer processes must be >= 1"):
        tokenize_files(corpus, [good], out, workers=-1)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    lines = tmp_path / "docs.jsonl"
    lines.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    for inputs, message in [([good, latin1], rf"{latin1}: not UTF-8 text \('utf-8' codec can't decode"),
                            ([lines], rf"{lines}:2: not UTF-8 text"),
                            ([blank], rf"no documents in {blank} \(blank \.jsonl lines are skipped\)")]:
        with pytest.raises(ValueError, match=message):
            tokenize_files(corpus, inputs, out, workers=1)
        assert sorted(p.name for p in out.parent.iterdir()) == []  # no train.bin.tmp, no index


# ------------------------------------------------------------------------------------------ runs and checkpoints
def test_training_learns_and_writes_everything(corpus, tmp_path):
    summary = Trainer(config(corpus, tmp_path, steps=30, save_every=10, eval_every=10, warmup_steps=3,
                             keep_last=2)).train()
    assert summary["val_loss"] < summary["unigram_entropy"]
    names = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"loss.png", "lr.png", "grad_norm.png", "balance_loss.png", "tokens_per_s.png", "expert_load.png"} <= names
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000020", "step-00000030"]  # the last 2 kept
    final = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "model")  # bf16 export, with the tokenizer
    assert final.dtype == torch.bfloat16 and final.tokenizer is not None
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "balance_loss", "tokens_per_s", "expert_load"} <= set(records[-1])
    transformers = pytest.importorskip("transformers")
    checkpoint = latest_checkpoint(tmp_path)
    theirs = transformers.DeepseekV2ForCausalLM.from_pretrained(checkpoint).eval()
    ours = DeepseekV2ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ids = torch.randint(0, 400, (1, 20))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() < 1e-4


def test_the_default_precision_trains_in_bf16_autocast_over_float32_weights(corpus, tmp_path):
    trainer = Trainer(config(corpus, tmp_path, steps=2, precision="bfloat16"))
    autocast_dtypes = []
    hook = trainer.model.model.layers[0].self_attn.register_forward_hook(
        lambda *_: autocast_dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                                          else None))
    records = [trainer.train_step(step) for step in range(2)]
    hook.remove()
    assert autocast_dtypes and set(autocast_dtypes) == {torch.bfloat16}
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in records)  # finite
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # master weights
    states = [v for state in trainer.optimizer.state.values() for v in state.values() if v.dim() > 0]
    assert states and {v.dtype for v in states} == {torch.float32}  # AdamW moments
    assert TrainConfig.load(None, data="x", steps=1).precision == "bfloat16"  # the default


class Crash(Exception):
    pass


def test_resumed_run_reproduces_the_uninterrupted_one(corpus, tmp_path):
    Trainer(config(corpus, tmp_path / "straight")).train()
    with pytest.raises(ValueError, match="written with seq_len=32, batch_size=4; this run has seq_len=16, batch_s"):
        Trainer(config(corpus, tmp_path / "straight", seq_len=16, batch_size=8))  # not the run that wrote it
    with pytest.raises(ValueError, match="written with model_overrides="):
        Trainer(config(corpus, tmp_path / "straight", model_overrides={**TINY, "hidden_size": 128}))
    first = Trainer(config(corpus, tmp_path / "resumed"))
    save = first.save

    def save_then_crash():
        save()
        if first.position.step == 3:
            raise Crash  # the process dies right after the step-3 checkpoint

    first.save = save_then_crash
    with pytest.raises(Crash):
        first.train()
    second = Trainer(config(corpus, tmp_path / "resumed"))
    assert second.position.step == 3
    second.train()
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # bit for bit on the CPU


def test_a_killed_save_leaves_the_last_checkpoint(corpus, tmp_path):
    """Kill the process (SIGKILL) while it writes the step-6 checkpoint; step 3 must still be there, whole."""
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import dsv2.train.checkpoint as ck
        from test_train import config
        from dsv2.train.trainer import Trainer
        from pathlib import Path
        real_save = torch.save
        def slow_save(obj, path, *args, **kwargs):
            if "step-00000006" in str(path):
                print("SAVING", flush=True)
                time.sleep(60)
            real_save(obj, path, *args, **kwargs)
        ck.torch.save = slow_save
        Trainer(config(Path({str(tmp_path)!r}) / "corpus", Path({str(tmp_path)!r}) / "run")).train()
    """)
    (tmp_path / "corpus").symlink_to(corpus)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and "SAVING" not in (line := proc.stdout.readline()):
            assert line or proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    run = tmp_path / "run"
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000003"]
    assert any(p.name.startswith(".step-00000006") for p in (run / "checkpoints").iterdir())  # the torn one
    DeepseekV2ForCausalLM.from_pretrained(latest_checkpoint(run))  # the last good one loads
    resumed = Trainer(config(corpus, run))
    assert resumed.position.step == 3
    resumed.train()
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000003", "step-00000006"]
    assert not any(p.name.startswith(".step") for p in (run / "checkpoints").iterdir())


def test_non_finite_losses_skip_steps_then_stop(corpus, tmp_path, caplog):
    trainer = Trainer(config(corpus, tmp_path, steps=10, max_bad_steps=3, keep_last=1))
    real_step = trainer.train_step
    calls = []

    def poisoned(step):
        calls.append(step)
        record = real_step(step)
        if step in (1, 4, 5, 6):
            record["loss"] = float("nan")
        return record

    trainer.train_step = poisoned
    with pytest.raises(TrainingStopped, match=r"3 non-finite losses in a row \(the last at step 7\): .* resumes "
                                              r"from the last checkpoint, step 3 \(.*step-00000003\)"):
        trainer.train()
    assert calls == [0, 1, 2, 3, 4, 5, 6]  # one bad step was skipped and training went on
    # counted from 1, as in metrics.jsonl and the checkpoints' names
    assert "step 2: non-finite loss (nan); step skipped (1 in a row)" in caplog.text
    assert "step 7: non-finite loss (nan); step skipped (3 in a row)" in caplog.text
    # step 6 fell in the streak: not saved, so keep_last=1 did not prune step 3, the last one from before it
    assert "step 6: no checkpoint saved during non-finite losses" in caplog.text
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000003"]
    strict = lambda token: pytest.fail(f"metrics.jsonl holds {token}, which is not JSON")  # noqa: E731
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=strict) for line in lines]
    # steps count from 1 in the log: the poisoned calls 1, 4 and 5 (the run stopped at call 6, before its record)
    assert [r["step"] for r in records if "loss" in r and r["loss"] is None] == [2, 5, 6]


def test_poisoned_gradients_do_not_touch_the_weights(corpus, tmp_path):
    trainer = Trainer(config(corpus, tmp_path, steps=1))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = float("inf")
    record = trainer.train_step(0)
    assert record["loss"] != record["loss"]  # NaN
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == ["lm_head.weight"]  # only our poke: the optimizer did not step


def test_a_non_finite_last_step_is_still_saved(corpus, tmp_path):
    """The run's end is saved whatever the loss (a skipped step leaves the weights as they were): a re-run finds
    the run complete."""
    trainer = Trainer(config(corpus, tmp_path, steps=4, save_every=2, max_bad_steps=5))
    real_step = trainer.train_step
    trainer.train_step = lambda step: {**real_step(step), **({"loss": float("nan")} if step >= 1 else {})}
    trainer.train()
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000004"]  # not step 2 (in the streak)


def test_ctrl_c_says_where_a_rerun_resumes_and_saves_nothing(corpus, tmp_path):
    trainer = Trainer(config(corpus, tmp_path))
    real_step, saved = trainer.train_step, []
    save = trainer.save
    trainer.save = lambda: (saved.append(trainer.position.step), save())

    def interrupted_at_the_fifth(step):
        if step == 4:
            raise KeyboardInterrupt
        return real_step(step)

    trainer.train_step = interrupted_at_the_fifth
    with pytest.raises(TrainingInterrupted, match=r"^interrupted after 4 of 6 steps; re-running the same command "
                                                  r"resumes from the last checkpoint, step 3 \("):
        trainer.train()
    assert saved == [3]  # no save on Ctrl-C (ranks could deadlock in a collective save)
    fresh = Trainer(config(corpus, tmp_path / "fresh"))
    fresh.train_step = lambda step: (_ for _ in ()).throw(KeyboardInterrupt)
    with pytest.raises(TrainingInterrupted, match="after 0 of 6 steps; no checkpoint was saved yet: re-running the "
                                                  "same command starts over"):
        fresh.train()


def test_a_torn_or_missing_checkpoint_file_is_named_with_what_to_do(corpus, tmp_path):
    Trainer(config(corpus, tmp_path, steps=3)).train()
    step_dir = latest_checkpoint(tmp_path)
    state = step_dir / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # a crash mid-copy
    with pytest.raises(ValueError, match=rf"{state}: not a readable checkpoint file \(PytorchStreamReader failed "
                                         rf".*\); remove {step_dir} to resume from the checkpoint before it"):
        Trainer(config(corpus, tmp_path, steps=3))
    shutil.rmtree(step_dir)
    Trainer(config(corpus, tmp_path, steps=6)).train()  # from scratch: no checkpoint left
    step_dir = latest_checkpoint(tmp_path)
    (step_dir / "rank-00000.pt").unlink()
    with pytest.raises(FileNotFoundError, match=rf"rank-00000.pt: missing from the checkpoint; remove {step_dir}"):
        Trainer(config(corpus, tmp_path, steps=6))
    (step_dir / "model.safetensors").write_bytes(b"torn")
    (tmp_path / "checkpoints" / "step-00000003" / "model.safetensors").write_bytes(b"torn")
    shutil.rmtree(step_dir)
    with pytest.raises(ValueError, match=r"cannot resume from .*step-00000003: .*model.safetensors.*; remove "):
        Trainer(config(corpus, tmp_path, steps=6))


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 6.0}\n{"step": 2, "loss": null}\n{"step": 3, "val_loss": 5.0}\n'
                    '{"step": 4, "lo')  # a crash mid-write
    log = MetricsLog(path, resume_step=3)
    assert "metrics.jsonl:4: dropping a torn last line" in caplog.text
    assert path.read_text() == '{"step": 1, "loss": 6.0}\n{"step": 2, "loss": null}\n{"step": 3, "val_loss": 5.0}\n'
    assert [r["step"] for r in log.read()] == [1, 2, 3] and not list(tmp_path.glob("*.tmp"))
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not valid JSON"):
        MetricsLog(path, resume_step=3)
    assert path.read_text() == '{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n'  # untouched


# ------------------------------------------------------------------------------------------------------------ SFT
def test_sft_mask_covers_exactly_the_assistant_turns(corpus):
    tok = Tokenizer.from_pretrained(corpus)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "Hello 🚀"}, {"role": "user", "content": "Again?"},
                {"role": "assistant", "content": "Yes."}]
    ids, targets = encode_conversation(tok, messages)
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
    masked = [i for i, t in zip(ids, targets, strict=True) if t]
    assert tok.decode(masked) == f" Hello 🚀{tok.eos_token} Yes.{tok.eos_token}"
    prompt = tok.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt and not any(targets[: len(prompt)])  # the inference prompt, untouched


def test_sft_runs(corpus, tmp_path):
    chats = tmp_path / "chats.jsonl"
    with chats.open("w") as f:
        for i in range(20):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say {i}"},
                                             {"role": "assistant", "content": f"{i} {i} {i}"}]}) + "\n")
    base = tmp_path / "base"
    Trainer(config(corpus, base, steps=2)).train()
    summary = Trainer(TrainConfig.load(None, model=str(base / "model"), sft_data=str(chats), seq_len=48,
                                       batch_size=4, micro_batch_size=2, epochs=1.0, warmup_steps=1, lr=1e-3,
                                       out=str(tmp_path / "sft"), eval_every=5, save_every=5, precision="float32",
                                       val_fraction=0.1)).train()
    assert "val_loss" in summary and (tmp_path / "sft" / "model" / "tokenizer.json").exists()
    long_question = [{"role": "user", "content": " ".join(["word"] * 200)}, {"role": "assistant", "content": "ok"}]
    tok = Tokenizer.from_pretrained(base / "model")
    too_long = encode_conversation(tok, long_question)
    assert len(too_long[0]) > 49 and not any(too_long[1][:49])
    dataset = ChatDataset([too_long, ([1, 2, 3, 4], [False, False, True, True])], seq_len=48, pad_id=0,
                          val_fraction=0)
    assert dataset.num_train == 1  # the answer past seq_len + 1 tokens left nothing to train on: left out
    with pytest.raises(ValueError, match="no conversations to train on"):
        ChatDataset([encode_conversation(tok, long_question)], seq_len=48, pad_id=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*'robot'"):
        Trainer(TrainConfig.load(None, model=str(base / "model"), sft_data=str(bad), steps=1,
                                 out=str(tmp_path / "x")))


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown training setting.*learning_rate"):
        TrainConfig.load(None, data="x", steps=1, learning_rate=1)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig.load(None, data="x", steps=1, batch_size=5, micro_batch_size=2)
    (tmp_path / "c.toml").write_text("[optim]\nlr = 1e-3\n[data]\ndata = 'x'\nsteps = 2\n")
    assert TrainConfig.load(tmp_path / "c.toml", steps=5).steps == 5


@pytest.mark.parametrize(("setting", "message"), [
    ({"seq_len": "64"}, "seq_len = '64': expected an integer, got str"),
    ({"seq_len": True}, "seq_len = True: expected an integer, got bool"),
    ({"steps": "2"}, "steps = '2': expected an integer or null, got str"),
    ({"lr": "fast"}, "lr = 'fast': expected a number, got str"),
    ({"decay_at": 0.5}, "decay_at = 0.5: expected a list of numbers, got float"),
    ({"model_overrides": 3}, "model_overrides = 3: expected an object, got int"),
    ({"grad_clip": -1.0}, r"grad_clip = -1.0: must be > 0"),
    ({"grad_clip": 0.0}, r"grad_clip = 0.0: must be > 0"),
    ({"decay_factor": -1.0}, "decay_factor = -1.0: must be a positive number"),
    ({"lr": -1e-3}, "lr = -0.001: must be a positive number"),
    ({"lr": float("nan")}, "lr = nan: must be a positive number"),
    ({"steps": 0}, "steps = 0: must be >= 1"),
    ({"steps": -3}, "steps = -3: must be >= 1"),
    ({"epochs": 0.0, "steps": None}, "epochs = 0.0: must be a positive number"),
    ({"warmup_steps": -1}, "warmup_steps = -1: must be >= 0"),
    ({"beta2": 1.0}, r"beta2 = 1.0: must be in \[0, 1\)"),
    ({"weight_decay": -0.1}, "weight_decay = -0.1: must be >= 0"),
    ({"export_dtype": "fp17"}, "export_dtype = 'fp17': one of float32, bfloat16, float16, float, fp32, bf16, half"),
    ({"model_overrides": {"num_layers": 2}}, r"model_overrides = \{'num_layers': 2\}: 'num_layers' is not a model "
                                             r"config field: did you mean 'num_hidden_layers'\?"),
    ({"model": "runs/x/model", "model_overrides": {"vocab_size": 1000}},
     r"model_overrides = \{'vocab_size': 1000\}: apply to a preset \(v2-lite, v2, nano\) only; model = "
     r"'runs/x/model' is a checkpoint"),
])
def test_settings_are_type_and_range_checked(setting, message):
    with pytest.raises(ValueError, match=f"^train config {message}"):
        TrainConfig.load(None, **{"data": "x", "steps": 1, **setting})


def test_a_bad_setting_from_a_toml_file_names_the_file(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('data = "x"\nsteps = 2\n[sequences]\nseq_len = "64"\n')
    with pytest.raises(ValueError, match=rf"^{toml}: train config seq_len = '64': expected an integer"):
        TrainConfig.load(toml)
    with pytest.raises(ValueError, match=r"^train config seq_len = -1: must be >= 1"):  # the flag's fault
        TrainConfig.load(toml, seq_len=-1)
    ok = TrainConfig.load(toml, seq_len=64, lr=1, export_dtype="bf16", grad_clip=5)  # ints where floats go
    assert (ok.lr, ok.grad_clip, ok.tokenizer) == (1, 5, None)


def test_a_model_override_of_the_wrong_type_is_named_before_any_work(corpus, tmp_path, monkeypatch):
    import dsv2.train.trainer

    monkeypatch.setattr(dsv2.train.trainer, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ValueError, match=r"^train config model_overrides: config field 'hidden_size' = '64': "
                                         "expected an integer"):
        Trainer(config(corpus, tmp_path, model_overrides={**TINY, "hidden_size": "64"}))


def test_a_commands_defaults_sit_below_the_config_file_and_the_flags(tmp_path):
    from dsv2.cli import SFT_DEFAULTS

    (tmp_path / "sft.toml").write_text("lr = 5e-4\nseq_len = 512\nsft_data = 'chats.jsonl'\n")
    config = TrainConfig.load(tmp_path / "sft.toml", defaults=SFT_DEFAULTS, seq_len=256)
    assert config.lr == 5e-4 and config.seq_len == 256  # the file over the defaults, a flag over the file
    assert config.epochs == SFT_DEFAULTS["epochs"] and config.batch_size == SFT_DEFAULTS["batch_size"]


def test_a_missing_or_folder_sft_data_path_is_named(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nonexist\.jsonl: no such chat data file \(JSONL, one "):
        ChatDataset.from_jsonl(tmp_path / "nonexist.jsonl", corpus, seq_len=16)
    with pytest.raises(FileNotFoundError, match="a folder, not a chat data file"):
        ChatDataset.from_jsonl(tmp_path, corpus, seq_len=16)
