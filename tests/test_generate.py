import pytest
import torch

from dsv2 import DeepseekV2ForCausalLM, LatentCache, Tokenizer
from dsv2.generate import generate

from helpers import TINY_LITE, TINY_V2, randomize_, tiny_checkpoint, tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model (vocabulary padded past the tokenizer's 400 ids, as the official 102,400 > 100,015) + tokenizer."""
    path = tmp_path_factory.mktemp("ckpt")
    return tiny_checkpoint(path, bos_token_id=0, eos_token_id=1)


@pytest.fixture(scope="module")
def model(checkpoint):
    return DeepseekV2ForCausalLM.from_pretrained(checkpoint)


@pytest.mark.parametrize("base", [TINY_LITE, TINY_V2], ids=["lite", "v2"])
def test_greedy_generate_equals_transformers(base, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**base))
    randomize_(hf, seed=3).eval()
    hf.save_pretrained(tmp_path)
    ours = DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    prompt = torch.randint(2, 128, (1, 20))
    kwargs = {"max_new_tokens": 40, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    got = ours.generate(prompt, **kwargs)
    assert got.tolist() == expected.tolist()
    assert len(set(got[0, 20:].tolist())) > 3


def test_batch_of_different_lengths_equals_one_at_a_time(model):
    prompts = [torch.randint(2, 400, (n,)).tolist() for n in (3, 17, 9, 1)]
    singles = [model.generate(torch.tensor([p]), max_new_tokens=12, ignore_eos=True)[0, len(p):].tolist()
               for p in prompts]
    # left-padded with an attention mask, as a transformers user would pass them
    width = max(map(len, prompts))
    ids = torch.tensor([[1] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, ignore_eos=True)
    assert batched[:, width:].tolist() == singles
    assert torch.equal(batched[:, :width], ids)


def test_eos_stop_ids_and_padding(model):
    prompt = torch.tensor([[0, 5, 6, 7]])
    free = model.generate(prompt, max_new_tokens=10, ignore_eos=True)[0, 4:].tolist()
    stop_at = free[3]
    cut = model.generate(prompt, max_new_tokens=10, stop_token_ids=[stop_at], ignore_eos=True)[0, 4:].tolist()
    assert cut == free[: free.index(stop_at) + 1]
    # as EOS: generation ends there; in a batch, the finished row is padded with pad_token_id
    both = model.generate(torch.tensor([[0, 5, 6, 7], [0, 9, 9, 9]]), max_new_tokens=10, eos_token_id=stop_at,
                          pad_token_id=3)
    row = both[0, 4:].tolist()
    assert row[: len(cut)] == cut and set(row[len(cut):]) <= {3}


def test_stop_strings_and_stream(model):
    tok = model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "你好 🚀"}], add_generation_prompt=True)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=30, ignore_eos=True)[0, len(prompt):]
    text = tok.decode(out, skip_special_tokens=True)
    deltas = list(model.stream(prompt, max_new_tokens=30, ignore_eos=True))
    assert "".join(deltas) == text and len(deltas) > 1
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop and stop in text
    streamed = "".join(model.stream(prompt, max_new_tokens=30, ignore_eos=True, stop_strings=[stop]))
    assert streamed == text[: text.index(stop)]
    ids = model.generate(torch.tensor([prompt]), max_new_tokens=30, ignore_eos=True, stop_strings=stop)
    assert stop in tok.decode(ids[0, len(prompt):]) and ids.shape[1] < len(prompt) + 30


def test_stream_leaves_out_the_stop_tokens_text_and_takes_one_prompt(model):
    tok = model.tokenizer
    prompt = [0, 5, 6, 7]
    free = model.generate(torch.tensor([prompt]), max_new_tokens=12, ignore_eos=True)[0, 4:].tolist()
    # a token with text of its own, first seen at position i >= 2
    i = next(i for i, t in enumerate(free) if i >= 2 and t not in free[:i] and tok.decode([t]))
    streamed = "".join(model.stream(prompt, max_new_tokens=12, ignore_eos=True, stop_token_ids=[free[i]]))
    assert streamed == tok.decode(free[:i], skip_special_tokens=True)
    with pytest.raises(ValueError, match="one prompt; got a batch of 2"):
        next(model.stream(torch.tensor([prompt, prompt]), max_new_tokens=2))


def test_generate_and_stream_in_training_mode_equal_eval_mode(model):
    """As transformers' generate, a model left in training mode still generates (no dropout: the same tokens)."""
    prompt = [0, 5, 6, 7]
    ids = torch.tensor([prompt, [0, 9, 10, 11]])
    ref = model.generate(ids, max_new_tokens=8, ignore_eos=True)
    text = "".join(model.stream(prompt, max_new_tokens=8, ignore_eos=True))
    model.train()
    try:
        assert torch.equal(model.generate(ids, max_new_tokens=8, ignore_eos=True), ref)
        assert "".join(model.stream(prompt, max_new_tokens=8, ignore_eos=True)) == text
        assert model.training
    finally:
        model.eval()


def test_seeded_sampling_repeats(model):
    prompt = torch.tensor([[0, 11, 12]])
    runs = [model.generate(prompt, max_new_tokens=20, temperature=1.0, seed=5, ignore_eos=True) for _ in range(2)]
    assert torch.equal(*runs)
    other = model.generate(prompt, max_new_tokens=20, temperature=1.0, seed=6, ignore_eos=True)
    greedy = model.generate(prompt, max_new_tokens=20, ignore_eos=True)
    assert not torch.equal(runs[0], other) and not torch.equal(runs[0], greedy)
    batch = model.generate(prompt.repeat(2, 1), max_new_tokens=20, temperature=1.0, seed=5, ignore_eos=True)
    assert torch.equal(batch[0], runs[0][0]) and torch.equal(batch[1], other[0])  # row i draws from seed + i


def test_cache_size_per_token(model, monkeypatch):
    caches = []
    monkeypatch.setattr(LatentCache, "__init__", _recording(LatentCache.__init__, caches))
    model.generate(torch.tensor([[0, 4, 5]]), max_new_tokens=5)
    (cache,) = caches
    c = model.config
    per_token = cache.nbytes // (cache.data.shape[1] * cache.max_len)
    assert per_token == (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * cache.data.element_size()
    assert cache.max_len == 3 + 5


def _recording(init, sink):
    def wrapper(self, *args, **kwargs):
        init(self, *args, **kwargs)
        sink.append(self)
    return wrapper


def test_generation_config_defaults_and_overrides(checkpoint, tmp_path):
    import json
    import shutil

    shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.3, "top_p": 0.95}))
    sampled = DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    assert sampled.generation_config.do_sample and sampled.generation_config.temperature == 0.3
    prompt = torch.tensor([[0, 11, 12]])
    greedy = DeepseekV2ForCausalLM.from_pretrained(checkpoint).generate(prompt, max_new_tokens=8, ignore_eos=True)
    assert torch.equal(sampled.generate(prompt, max_new_tokens=8, do_sample=False, ignore_eos=True), greedy)


def test_a_generation_config_without_eos_still_stops_at_the_models_eos(checkpoint, tmp_path):
    import shutil

    from helpers import make_eos_prone_

    shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").write_text('{"do_sample": false}')
    model = make_eos_prone_(DeepseekV2ForCausalLM.from_pretrained(tmp_path), strength=50.0)
    assert model.generation_config.eos_token_id is None
    out = model.generate(torch.tensor([[0, 11, 12]]), max_new_tokens=20)[0, 3:].tolist()
    assert out[0] == model.config.eos_token_id and len(out) == 1  # stopped at the first EOS


def test_generate_rejects_bad_input(model):
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
        generate(model, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=10**6)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        generate(model, torch.tensor([[1, 2]]), stop_strings=["x"])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        tiny_model().stream([1, 2])
    with pytest.raises(TypeError, match=r"unsupported arguments: output_scores \(supported: max_new_tokens"):
        model.generate(torch.tensor([[1, 2]]), output_scores=True)
    with pytest.raises(ValueError, match="beam search is not supported"):
        model.generate(torch.tensor([[1, 2]]), num_beams=4)


def test_beam_search_is_refused_with_the_supported_arguments_listed(model):
    with pytest.raises(ValueError, match=r"num_beams=2: beam search is not supported, only greedy decoding or "
                                         r"sampling \(supported: max_new_tokens, .*top_p.*, use_cache, num_beams=1\)"):
        model.generate(torch.tensor([[1, 2]]), num_beams=2)
    assert model.generate(torch.tensor([[1, 2]]), num_beams=None, max_new_tokens=1).shape == (1, 3)


def test_transformers_keywords_max_length_use_cache_and_return_dict(model):
    prompt = torch.tensor([[0, 5, 6, 7]])
    want = model.generate(prompt, max_new_tokens=3, ignore_eos=True)
    assert torch.equal(model.generate(prompt, max_length=7, use_cache=True, num_beams=1, ignore_eos=True), want)
    assert torch.equal(model.generate(prompt, max_length=50, max_new_tokens=3, ignore_eos=True), want)  # new wins
    with pytest.raises(ValueError, match="max_length=4 leaves no room"):
        model.generate(prompt, max_length=4)
    tok = model.tokenizer
    messages = [{"role": "user", "content": "hi"}]
    encoded = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert encoded["input_ids"].tolist() == [ids] and encoded["attention_mask"].tolist() == [[1] * len(ids)]
    out = model.generate(**encoded, max_new_tokens=2, ignore_eos=True)  # transformers 5's usual call
    assert out.shape == (1, len(ids) + 2)
    plain = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert plain["input_ids"] == ids and plain.attention_mask == [1] * len(ids)


def test_model_card_snippets_run_with_only_the_import_and_path_changed(checkpoint, monkeypatch, capsys):
    """The two Transformers snippets of the DeepSeek-V2-Lite model card, verbatim apart from the import line and the
    model path (and `.cuda()` made a no-op where there is no GPU)."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    imports = ("import torch\nfrom dsv2 import Tokenizer as AutoTokenizer, DeepseekV2ForCausalLM as "
               "AutoModelForCausalLM, GenerationConfig\n")
    text_completion = imports + f'model_name = "{checkpoint}"\n' + '''
tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(model_name, trust_remote_code=True, torch_dtype=torch.bfloat16).cuda()
model.generation_config = GenerationConfig.from_pretrained(model_name)
model.generation_config.pad_token_id = model.generation_config.eos_token_id

text = "An attention function can be described as mapping a query and a set of key-value pairs to an output, where the query, keys, values, and output are all vectors. The output is"
inputs = tokenizer(text, return_tensors="pt")
outputs = model.generate(**inputs.to(model.device), max_new_tokens=100)

result = tokenizer.decode(outputs[0], skip_special_tokens=True)
print(result)
'''
    chat = imports + f'model_name = "{checkpoint}"\n' + '''
tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(model_name, trust_remote_code=True, torch_dtype=torch.bfloat16).cuda()
model.generation_config = GenerationConfig.from_pretrained(model_name)
model.generation_config.pad_token_id = model.generation_config.eos_token_id

messages = [
    {"role": "user", "content": "Write a piece of quicksort code in C++"}
]
input_tensor = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
outputs = model.generate(input_tensor.to(model.device), max_new_tokens=100)

result = tokenizer.decode(outputs[0][input_tensor.shape[1]:], skip_special_tokens=True)
print(result)
'''
    exec(compile(text_completion, "model_card_text_completion", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("An attention function can be described as mapping a query") and len(out) > 200
    exec(compile(chat, "model_card_chat", "exec"), {})
    assert capsys.readouterr().out.strip()
    assert Tokenizer.from_pretrained(checkpoint).vocab_size < 512


class RecordingStreamer:
    def __init__(self):
        self.values, self.ended = [], 0

    def put(self, value):
        self.values.append(value.tolist())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("chunk", [1, 16])
def test_streamer_gets_the_prompt_then_each_steps_tokens(model, monkeypatch, chunk):
    """transformers' streamer protocol: put(input_ids), a put of every step's tokens [B] (a finished row's: the pad
    id), end(); the same whether the greedy steps come one at a time or several in one call."""
    import dsv2.generate

    monkeypatch.setattr(dsv2.generate.GreedyChunks, "CHUNK_SECONDS", 1e9)
    monkeypatch.setattr(dsv2.generate.GreedyChunks, "MAX_CHUNK", chunk)
    prompts = torch.tensor([[0, 5, 6, 7], [0, 9, 9, 9]])
    free = model.generate(prompts, max_new_tokens=12, ignore_eos=True)[:, 4:]
    eos = int(free[0, 2])
    streamer = RecordingStreamer()
    out = model.generate(prompts, max_new_tokens=12, eos_token_id=eos, pad_token_id=3, streamer=streamer)
    assert streamer.values[0] == prompts.tolist() and streamer.ended == 1
    assert torch.tensor(streamer.values[1:]).T.tolist() == out[:, 4:].tolist()
    assert out[0, 4:].tolist()[:3] == free[0, :3].tolist()


def test_transformers_text_streamer_prints_the_completion(model, capsys):
    transformers = pytest.importorskip("transformers")
    tok = model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "你好 🚀"}], add_generation_prompt=True)
    streamer = transformers.TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=20, ignore_eos=True, streamer=streamer)
    printed = capsys.readouterr().out
    assert printed.rstrip("\n") == tok.decode(out[0, len(prompt):], skip_special_tokens=True).rstrip("\n")


def test_greedy_chunks_fit_the_time_budget_and_stop_after_a_refusal():
    """The first step alone; then as many steps as take CHUNK_SECONDS at the last step time (at most MAX_CHUNK, never
    more than remain); a model that declines a multi-step call gets single steps from then on."""
    from dsv2.generate import GreedyChunks

    chunks = GreedyChunks()
    assert chunks.size(100) == 1
    chunks.record(0.004, 1, None)  # one forward step of 4 ms
    assert chunks.size(100) == int(GreedyChunks.CHUNK_SECONDS / 0.004) and chunks.size(3) == 3
    chunks.record(0.0004, 8, torch.zeros(1, 8))  # 8 steps of 50 µs
    assert chunks.size(100) == GreedyChunks.MAX_CHUNK
    chunks.record(2.0, 1, None)  # a slow model: one step at a time
    assert chunks.size(100) == 1
    chunks.record(0.001, 4, None)  # asked for 4, declined
    assert chunks.refused and chunks.size(100) == 1
