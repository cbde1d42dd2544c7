import re
import subprocess
import sys

import pytest

from dsv2.cli import main

from helpers import tiny_checkpoint, tiny_model
from test_train import TINY, corpus  # noqa: F401  (corpus: the fixture)


def test_info_on_the_v2_lite_preset(capsys):
    main(["info", "v2-lite"])
    out = capsys.readouterr().out
    assert "15,706,484,224" in out  # total parameters, exactly the published count
    assert "2.45B without the input embedding" in out  # the model card's "2.4B activated"
    assert "31,104 bytes (27 layers × 576 values)" in out  # latent cache per token in bf16
    assert "276,480 bytes" in out and "8.9× the latent" in out  # what a per-head K/V cache would need


def test_info_on_v2_and_on_a_checkpoint_folder(capsys, tmp_path):
    main(["info", "v2"])
    out = capsys.readouterr().out
    assert "235,741,434,880 (235.74B)" in out and "20.85B without the input embedding" in out
    tiny_model().save_pretrained(tmp_path)
    main(["info", str(tmp_path), "--dtype", "float32"])
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "KV cache per token (float32)" in out
    assert "480 bytes (3 layers × 40 values)" in out  # 3 × (32 + 8) × 4 bytes


def test_console_command_reports_bad_input_clearly(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    result = subprocess.run([sys.executable, "-m", "dsv2", "info", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "'model_type' = 'llama'" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "dsv2", "info", "no-such-thing"], capture_output=True, text=True)
    assert result.returncode != 0 and "neither a preset" in result.stderr


def test_generate_command_streams_the_greedy_completion(tmp_path, capsys):
    import torch

    from dsv2 import DeepseekV2ForCausalLM


    tiny_checkpoint(tmp_path)
    main(["generate", "--model", str(tmp_path), "Hello 你好", "--max-new-tokens", "12", "--ignore-eos"])
    printed = capsys.readouterr().out
    model = DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    ids = model.tokenizer.encode("Hello 你好")
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, ignore_eos=True)[0, len(ids):]
    assert printed == model.tokenizer.decode(out, skip_special_tokens=True) + "\n"
    main(["generate", "--model", str(tmp_path), "Hi", "--chat", "--system", "Be brief.", "--max-new-tokens", "3"])
    assert capsys.readouterr().out.endswith("\n")


def test_generate_chat_prints_the_answer_without_the_templates_space(tmp_path, capsys, monkeypatch):
    import dsv2.generate

    tiny_checkpoint(tmp_path)
    monkeypatch.setattr(dsv2.generate, "stream", lambda *args, **kwargs: iter(["", " Hi", " there"]))
    main(["generate", "--model", str(tmp_path), "Hello", "--chat"])
    assert capsys.readouterr().out == "Hi there\n"  # as the chat REPL prints it
    main(["generate", "--model", str(tmp_path), "Hello"])  # a plain completion keeps its text as generated
    assert capsys.readouterr().out == " Hi there\n"


def test_generate_without_a_model_uses_the_bundled_one():
    from dsv2.bundled import bundled_model

    result = subprocess.run([sys.executable, "-m", "dsv2", "generate", "Hello", "--max-new-tokens", "4"],
                            capture_output=True, text=True)
    if bundled_model() is None:
        assert result.returncode == 2 and "bundled model is not installed" in result.stderr
    else:
        assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_bench_command(tmp_path, capsys):

    tiny_checkpoint(tmp_path)
    main(["bench", "--model", str(tmp_path), "--requests", "4", "--prompt-len", "8", "--max-tokens", "4",
          "--kv-cache-memory", "2000000"])
    out = capsys.readouterr().out
    assert "4 requests × (8 prompt + 4 generated tokens)" in out and "generated tokens/s" in out


def test_a_temperature_flag_samples_whatever_the_configs_do_sample():
    from dsv2.cli import build_parser, generate_kwargs

    args = build_parser().parse_args(["chat", "--temperature", "0.8"])
    assert generate_kwargs(args) == {"temperature": 0.8, "do_sample": True}
    assert generate_kwargs(build_parser().parse_args(["chat", "--temperature", "0"])) == {"temperature": 0.0}
    assert generate_kwargs(build_parser().parse_args(["chat"])) == {}


def test_training_commands_tokenize_train_and_sft(corpus, tmp_path, capsys):  # noqa: F811
    """`dsv2 tokenize`, `dsv2 train --config x.toml` with flags over it, and `dsv2 sft`, as a user types them."""
    import json

    docs = sorted(str(p) for p in corpus.glob("doc*.txt"))
    main(["tokenize", "--tokenizer", str(corpus), "--input", *docs, "--output", str(tmp_path / "data.bin"),
          "--workers", "1"])
    assert f"{len(docs)} documents" in capsys.readouterr().out
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "nano"\ntokenizer = "{corpus}"\ndata = "{tmp_path / "data.bin"}"\nseq_len = 16\n'
                    'batch_size = 4\nmicro_batch_size = 2\nsteps = 50\nwarmup_steps = 1\nlr = 1e-3\n'
                    'precision = "float32"\nsave_every = 2\neval_every = 2\nlog_every = 1\n')
    out = tmp_path / "pre"
    main(["train", "--config", str(toml), "--steps", "4", "--decay-at", "0.5", "0.75", "--out", str(out),
          "--model-overrides", json.dumps(TINY)])  # the flags win over the file
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3 * 0.316, 1e-3 * 0.316**2])  # 4 steps, decays at 50% and 75%
    assert "validation loss" in capsys.readouterr().out
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}"},
                                                       {"role": "assistant", "content": f"{i} {i}"}]}) + "\n"
                             for i in range(8)))
    main(["sft", "--model", str(out / "model"), "--data", str(chats), "--out", str(tmp_path / "sft"), "--steps", "2",
          "--seq-len", "32", "--batch-size", "2", "--micro-batch-size", "1", "--precision", "float32"])
    assert (tmp_path / "sft" / "model" / "config.json").exists()


def test_sft_help_shows_the_defaults_sft_uses(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one flag per line
    with pytest.raises(SystemExit) as done:
        main(["sft", "--help"])
    assert done.value.code == 0
    sft = capsys.readouterr().out
    for flag, value in [("--lr LR", "5e-06"), ("--seq-len SEQ_LEN", "2048"), ("--warmup-steps WARMUP_STEPS", "10"),
                        ("--epochs EPOCHS", "2.0"), ("--batch-size BATCH_SIZE", "16"), ("--model MODEL", "nano"),
                        ("--out OUT", "runs/sft")]:  # not train's runs/train, whose checkpoint it would resume
        assert re.search(rf"{flag}\s+\(default: {re.escape(value)}\)", sft), flag
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert re.search(r"--lr LR\s+\(default: 0.00042\)", capsys.readouterr().out)  # train's own, unchanged


def test_a_missing_sft_data_file_is_named_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    import dsv2.train.trainer

    def no_run(config):
        raise AssertionError("training started before the data file was checked")

    monkeypatch.setattr(dsv2.train.trainer, "run_training", no_run)
    missing = tmp_path / "nonexist.jsonl"
    with pytest.raises(SystemExit) as failed:
        main(["sft", "--data", str(missing), "--steps", "1"])
    assert failed.value.code == 2
    err = capsys.readouterr().err
    assert err == f'dsv2 sft: {missing}: no such chat data file (JSONL, one {{"messages": [...]}} per line)\n'


@pytest.mark.parametrize("command", [["generate", "Hi"], ["chat"], ["serve"], ["eval", "--data-dir", "x"], ["bench"]])
def test_a_device_this_machine_lacks_is_a_clear_error_before_any_work(command, monkeypatch, capsys):
    import torch

    import dsv2.bundled

    def no_model(*args, **kwargs):
        raise AssertionError("a model was looked for before --device was checked")

    monkeypatch.setattr(dsv2.bundled, "resolve_model", no_model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in [("cuda", "--device cuda: CUDA is not available"),
                            ("cuda:0", "--device cuda:0: CUDA is not available"),
                            ("gpu", "--device 'gpu' is not a device (cpu, cuda, cuda:1, ..., or auto)")]:
        with pytest.raises(SystemExit) as failed:
            main([*command, "--model", "no-such-model", "--device", device])
        err = capsys.readouterr().err
        assert failed.value.code == 2 and err.startswith(f"dsv2 {command[0]}: {message}"), err
        assert "Traceback" not in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit):
        main([*command, "--model", "no-such-model", "--device", "cuda:1"])
    assert "--device cuda:1: this machine has 1 CUDA device(s) (cuda:0 to cuda:0)" in capsys.readouterr().err


def test_training_failures_are_one_line_errors(corpus, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A bad out path, a run stopped by non-finite losses, Ctrl-C and a malformed flag: `dsv2 train: ...` on one
    line, no traceback, a non-zero exit status."""
    import json
    import math

    from dsv2.train.trainer import Trainer

    def train(*flags: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as failed:
            main(["train", "--model-overrides", json.dumps(TINY), "--tokenizer", str(corpus), "--data",
                  str(corpus / "data/train.bin"), "--seq-len", "16", "--batch-size", "2", "--micro-batch-size", "2",
                  "--steps", "4", "--precision", "float32", "--out", str(tmp_path / "run"), *flags])
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("dsv2 train:") == 1, err
        return failed.value.code, err.splitlines()[-1]

    (tmp_path / "afile").write_text("")
    assert train("--out", str(tmp_path / "afile")) == (
        2, f"dsv2 train: out = {tmp_path / 'afile'}: is a file, not a folder for the run's checkpoints and logs")
    assert train("--out", str(tmp_path / "afile" / "run")) == (1, f"dsv2 train: {tmp_path / 'afile' / 'run'}: Not a "
                                                                 "directory")
    assert train("--model-overrides", "{num_hidden_layers: 2}")[1].startswith(
        "dsv2 train: --model-overrides '{num_hidden_layers: 2}': not valid JSON (Expecting property name")
    assert train("--grad-clip", "-1") == (2, "dsv2 train: train config grad_clip = -1.0: must be > 0 (the maximum "
                                             "gradient norm; the paper uses 1.0)")
    real_step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, step: {**real_step(self, step), "loss": math.nan})
    code, message = train("--max-bad-steps", "2")
    assert code == 1 and message.startswith("dsv2 train: 2 non-finite losses in a row (the last at step 2)")

    def interrupted(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    assert train("--save-every", "2", "--out", str(tmp_path / "run2")) == (
        130, f"dsv2 train: interrupted after 2 of 4 steps; re-running the same command resumes from the last "
             f"checkpoint, step 2 ({tmp_path / 'run2' / 'checkpoints' / 'step-00000002'})")


def test_tokenize_errors_name_the_path(corpus, tmp_path, capsys):  # noqa: F811
    def tokenize(inputs: list[str], output: str, *flags: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as failed:
            main(["tokenize", "--tokenizer", str(corpus), "--input", *inputs, "--output", output, *flags])
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        return failed.value.code, err.strip()

    good = str(corpus / "doc00.txt")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"text, then \xf0\x28\x8c\x28")
    code, err = tokenize([good, str(binary)], str(tmp_path / "out.bin"), "--workers", "1")
    assert code == 2 and err.startswith(f"dsv2 tokenize: {binary}: not UTF-8 text ('utf-8' codec can't decode byte "
                                        "0xf0 in position 11")
    assert not list(tmp_path.glob("out*"))  # no out.bin.tmp left behind
    assert tokenize([good], str(tmp_path)) == (2, f"dsv2 tokenize: {tmp_path}: is a folder; --output names the .bin "
                                                  "file to write (its index goes next to it)")
    assert tokenize([good], str(tmp_path / "x.bin"), "--workers", "-1") == (
        2, "dsv2 tokenize: workers = -1: the number of tokenizer processes must be >= 1")
    assert tokenize([good], str(binary / "x.bin")) == (2, f"dsv2 tokenize: {binary}: is a file, not a folder for "
                                                          f"--output {binary / 'x.bin'}")
    assert tokenize([good], str(binary / "x" / "y.bin")) == (1, f"dsv2 tokenize: {binary / 'x'}: Not a directory")


@pytest.mark.parametrize("flag", ["--requests", "--prompt-len", "--max-tokens"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_bench_refuses_counts_below_one_before_loading_a_model(flag, value, capsys, monkeypatch):
    import dsv2.engine.llm

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(dsv2.engine.llm, "LLM", no_model)
    with pytest.raises(SystemExit) as exit_:
        main(["bench", flag, value])
    assert exit_.value.code == 2 and f"{flag} {value}: must be at least 1" in capsys.readouterr().err
