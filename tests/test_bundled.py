"""The bundled model: its pipeline end to end on a miniature corpus, and the shipped artifact itself."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv2 import DeepseekV2ForCausalLM
from dsv2.bundled import bundled_model

ROOT = Path(__file__).resolve().parents[1]


def mini_corpus(folder: Path) -> None:
    """A few kilobytes in the layouts scripts/build_corpus.py writes."""
    folder.mkdir(parents=True)
    para = ("Emma Woodhouse, handsome, clever, and rich, had lived nearly twenty-one years in the world. She was the "
            "youngest of the two daughters of a most affectionate father. Her mother had died too long ago for her "
            "to have more than an indistinct remembrance of her caresses.")
    (folder / "austen.txt").write_text("# Emma\n\nEMMA\n\n" + "".join(f"CHAPTER {i}\n\n{para}\n\n{para}\n\n"
                                                                      for i in range(1, 6)))
    verses = "\n".join(f"{v} In the beginning, God created the heavens and the earth, verse {v} of many more."
                       for v in range(1, 12))
    (folder / "bible_web.txt").write_text("# Genesis\n\n" + "".join(f"## Genesis {c}\n{verses}\n\n" for c in (1, 2, 3)))
    speech = "HAMLET.\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n\n"
    (folder / "shakespeare.txt").write_text("# Hamlet\n\n" + "".join(f"SCENE {i}. Elsinore.\n\n{speech * 3}"
                                                                     for i in range(1, 4)))
    poem = "《静夜思》\n作者：李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n\n"
    (folder / "tang300.txt").write_text(poem * 6)
    (folder / "song100.txt").write_text(poem.replace("作者：", "作者:") * 3)
    (folder / "SOURCES.md").write_text("# Corpus sources\n\nA miniature corpus for the pipeline test.\n")


def test_the_pipeline_end_to_end_in_a_few_steps(tmp_path):
    mini_corpus(tmp_path / "data" / "corpus")
    out = tmp_path / "model"
    subprocess.run([sys.executable, str(ROOT / "scripts/train_bundled.py"), "--work", str(tmp_path), "--out",
                    str(out), "--quick"], check=True, capture_output=True, text=True)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "README.md", "pretrain_loss.png", "sft_loss.png"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "| pre-training |" in card and "Sample answers" in card and "configs/bundled-pretrain.toml" in card
    model = DeepseekV2ForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.generation_config.do_sample
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True)
    assert model.generate(torch.tensor([ids]), max_new_tokens=4).shape[1] > len(ids)


needs_bundled = pytest.mark.skipif(bundled_model() is None, reason="the bundled model is not in this checkout")


@needs_bundled
def test_the_bundled_model_is_small_and_complete():
    folder = bundled_model()
    assert (folder / "model.safetensors").stat().st_size <= 40e6
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (folder / name).exists(), name
    card = (folder / "README.md").read_text()
    assert "unigram entropy" in card and "Sample answers" in card


@needs_bundled
def test_the_bundled_model_loads_in_transformers_with_the_same_logits():
    transformers = pytest.importorskip("transformers")
    folder = bundled_model()
    ours = DeepseekV2ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs = transformers.DeepseekV2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([ours.tokenizer.encode("It is a truth universally acknowledged, 床前明月光")])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-3


@needs_bundled
def test_the_bundled_model_answers_in_the_chat_format_and_stops():
    model = DeepseekV2ForCausalLM.from_pretrained(bundled_model())
    tok = model.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True)
    out = model.generate(torch.tensor([ids]), max_new_tokens=200, do_sample=False)[0, len(ids):].tolist()
    assert tok.eos_token_id in out  # it ends its answer
    assert "dsv2" in tok.decode(out, skip_special_tokens=True)


@needs_bundled
def test_the_bundled_model_runs_every_benchmark_on_the_fixtures(tmp_path):
    from dsv2.eval.runner import evaluate
    from dsv2.eval.tasks import BENCHMARKS

    results = evaluate(None, list(BENCHMARKS), ROOT / "tests" / "fixtures" / "eval", tmp_path, limit=2,
                       use_tqdm=False, kv_cache_memory=64_000_000)
    assert [r.benchmark.name for r in results] == list(BENCHMARKS)
    for r in results:
        assert len(r.samples) == 2 and all(s["prompt"] for s in r.samples)  # --limit 2, every prompt kept
        assert r.score == 100.0 * sum(s["correct"] for s in r.samples) / 2


@needs_bundled
def test_serve_without_a_model_answers_the_openai_client():
    import signal
    import subprocess
    import sys
    import time

    import httpx
    import openai

    from helpers import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dsv2", "serve", "--port", str(port), "--kv-cache-memory",
                             "16000000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        [served] = [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(model=served, messages=[{"role": "user", "content": "Who are you?"}],
                                               max_tokens=200, temperature=0)
        assert "dsv2" in reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
