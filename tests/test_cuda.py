"""The CUDA paths against the same oracles as the CPU ones: transformers' model on the same GPU, our own float32
run on the CPU, the reference `generate`. Every test is marked `cuda`: it skips where torch sees no GPU (CI), and
runs with ``pytest -m cuda``.

Float32 on the GPU: cuBLAS and the attention kernels sum in other orders than the CPU's, so logits agree to ~1e-5
of their size, not bitwise; TF32 stays off (torch's default for matmuls), as a user comparing float32 runs expects."""

import json

import pytest
import torch

from dsv2 import LLM, DeepseekV2ForCausalLM, LatentCache, SamplingParams
from dsv2.generate import generate
from dsv2.train.config import TrainConfig
from dsv2.train.parallel import init_distributed
from dsv2.train.trainer import Trainer

from helpers import TINY_LITE, TINY_V2, TRAIN_TINY, greedy_continuation, hf_model, make_corpus, tiny_checkpoint

pytestmark = pytest.mark.cuda
transformers = pytest.importorskip("transformers")
CONFIGS = {"lite": TINY_LITE, "v2": TINY_V2}
CUDA = torch.device("cuda")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    """A random tiny checkpoint that transformers wrote. → its folder."""
    path = tmp_path_factory.mktemp(request.param)
    hf_model(CONFIGS[request.param]).save_pretrained(path)
    return path


def load_pair(path, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """(transformers', ours) from the same folder, both on the GPU in ``dtype``."""
    theirs = transformers.DeepseekV2ForCausalLM.from_pretrained(path, dtype=dtype,
                                                                attn_implementation=attn_implementation)
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = 0
    ours = DeepseekV2ForCausalLM.from_pretrained(path, dtype=dtype, device="cuda")
    return theirs.to(CUDA).eval(), ours


@torch.no_grad()
def test_float32_logits_match_transformers_on_the_gpu(saved):
    theirs, ours = load_pair(saved, torch.float32)
    assert ours.device.type == "cuda" and all(p.is_cuda for p in ours.parameters())
    ids = torch.randint(2, 128, (2, 64), device=CUDA)
    expected = theirs(ids).logits
    got = ours(ids)
    assert got.is_cuda and got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-4
    assert expected.abs().max() > 1.0  # logits far from zero: the bound is not vacuous
    positions = torch.arange(2400, 2464, device=CUDA)[None]  # far past original_max_position_embeddings (YaRN)
    far = ours(ids[:1], positions=positions) - theirs(ids[:1], position_ids=positions).logits
    assert far.abs().max() <= 1e-4


@torch.no_grad()
def test_float32_on_the_gpu_equals_float32_on_the_cpu(saved):
    on_cpu = DeepseekV2ForCausalLM.from_pretrained(saved, dtype=torch.float32)
    on_gpu = DeepseekV2ForCausalLM.from_pretrained(saved, dtype=torch.float32, device="cuda")
    ids = torch.randint(2, 128, (3, 40))
    assert (on_gpu(ids.cuda()).cpu() - on_cpu(ids)).abs().max() <= 1e-4


@torch.no_grad()
def test_greedy_generate_equals_transformers_on_the_gpu(saved):
    theirs, ours = load_pair(saved, torch.float32)
    prompt = torch.randint(2, 128, (1, 16), device=CUDA)
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False)
    got = ours.generate(prompt, max_new_tokens=32, eos_token_id=[])
    assert got.is_cuda and got.tolist() == expected.tolist()
    assert len(set(got[0, 16:].tolist())) > 3  # a non-degenerate continuation


@torch.no_grad()
def test_bf16_on_the_gpu_is_as_close_to_float32_as_transformers_eager(saved):
    """bf16 rounds everywhere; ours may move from the float32 logits no further than transformers' eager bf16 path
    (which computes as the reference does), on the same GPU."""
    path = saved
    float32, _ = load_pair(path, torch.float32)
    reference, ours = load_pair(path, torch.bfloat16, attn_implementation="eager")
    ids = torch.randint(2, 128, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    exact = float32(ids).logits

    def distance(logits: torch.Tensor) -> float:
        return ((logits.float() - exact).abs().mean() / exact.abs().mean()).item()

    got = ours(ids)
    assert got.dtype == torch.float32
    assert distance(got) <= 1.25 * distance(reference(ids).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_latent_cache_decoding_on_the_gpu_equals_the_full_forward(saved, dtype):
    """Prefill + token-by-token steps over the latent cache (absorbed attention) against one forward over the whole
    sequence, both on the GPU; the cache lives there and holds only latent + RoPE key rows. In bf16 both round, so
    each is measured against the float32 model: the cached steps no further from it than the bf16 forward."""
    model = DeepseekV2ForCausalLM.from_pretrained(saved, dtype=dtype, device="cuda")
    ids = torch.randint(2, 128, (2, 24), device=CUDA)
    cache = LatentCache(model.config, 2, 24, dtype=dtype, device="cuda")
    assert cache.data.is_cuda and cache.data.shape[-1] == model.config.kv_lora_rank + model.config.qk_rope_head_dim
    steps = [model(ids[:, :16], cache=cache)[:, -1]]
    steps += [model(ids[:, t:t + 1], cache=cache)[:, -1] for t in range(16, 23)]
    cached = torch.stack(steps, dim=1)  # [2, 8, V]
    full = model(ids)[:, 15:23]
    model.attn_impl = "expanded"
    expanded = model(ids)[:, 15:23]
    if dtype == torch.float32:
        assert (cached - full).abs().max() <= 1e-4 and (expanded - full).abs().max() <= 1e-4
        return
    exact = DeepseekV2ForCausalLM.from_pretrained(saved, dtype=torch.float32, device="cuda")(ids)[:, 15:23]

    def distance(logits: torch.Tensor) -> float:
        return ((logits - exact).abs().mean() / exact.abs().mean()).item()

    assert distance(cached) <= 1.5 * distance(expanded) + 1e-3
    assert distance(full) <= 1.5 * distance(expanded) + 1e-3


@torch.no_grad()
def test_sampling_on_the_gpu_is_seeded_and_top_k_1_is_greedy(saved):
    model = DeepseekV2ForCausalLM.from_pretrained(saved, dtype=torch.bfloat16, device="cuda")
    prompt = torch.randint(2, 128, (2, 8), device=CUDA)
    settings = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95, seed=7, eos_token_id=[])
    first, second = generate(model, prompt, **settings), generate(model, prompt, **settings)
    assert first.tolist() == second.tolist()
    greedy = generate(model, prompt, max_new_tokens=16, eos_token_id=[])
    assert generate(model, prompt, **{**settings, "top_k": 1}).tolist() == greedy.tolist()
    assert first.tolist() != greedy.tolist()  # temperature 1.5 over random logits does leave the greedy path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random checkpoint with the test tokenizer (V2-shaped: query compression, group-limited routing)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("engine"), TINY_V2)


def test_stream_on_the_gpu_yields_the_generated_text(checkpoint):
    model = DeepseekV2ForCausalLM.from_pretrained(checkpoint, device="cuda")
    ids = model.tokenizer.encode("深度求索 attention 🚀")
    out = model.generate(torch.tensor([ids], device=CUDA), max_new_tokens=20, ignore_eos=True)
    text = "".join(model.stream(ids, max_new_tokens=20, ignore_eos=True))
    assert text == model.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_on_the_gpu_equals_reference_generate(checkpoint, dtype):
    """Continuous batching over the paged latent cache on the GPU (prefix caching on, prompts sharing prefixes, small
    prefill budget: several steps and chunks) gives the tokens of one-at-a-time `generate` on the GPU."""
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(2, 400, (40,), generator=gen).tolist()
    prompts = [shared[: i % 3 * 20] + torch.randint(2, 400, (int(torch.randint(1, 50, (1,), generator=gen)),),
                                                     generator=gen).tolist() for i in range(12)]
    model = DeepseekV2ForCausalLM.from_pretrained(checkpoint, dtype=dtype, device="cuda")
    reference = [generate(model, torch.tensor([p], device=CUDA), max_new_tokens=10, ignore_eos=True)[0, len(p):]
                 .tolist() for p in prompts]
    llm = LLM(model=checkpoint, dtype=dtype, device="cuda", kv_cache_memory=8_000_000, max_num_batched_tokens=64)
    assert llm.engine.cache.data.is_cuda
    outputs = llm.generate(prompt_token_ids=prompts, use_tqdm=False,
                           sampling_params=SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    got = [o.outputs[0].token_ids for o in outputs]
    if dtype == torch.float32:
        assert got == reference
    else:  # batched bf16 matmuls round differently from one row at a time: near-ties may flip late tokens
        assert sum(g[:3] == r[:3] for g, r in zip(got, reference, strict=True)) >= 10
    assert llm.engine.blocks.prefix_hits > 0


def test_engine_sizes_its_cache_from_free_gpu_memory(checkpoint):
    """No kv_cache_memory: the share gpu_memory_utilization of the device's memory, less what is in use and 5% for
    activations, capped at what max_num_seqs sequences of max_model_len tokens can use."""
    llm = LLM(model=checkpoint, device="cuda", gpu_memory_utilization=0.5, max_model_len=256, max_num_seqs=4)
    assert llm.engine.cache.data.is_cuda and llm.engine.config.num_blocks == 4 * 256 // 16
    out = llm.generate(["Write a piece of quicksort code"], SamplingParams(temperature=0, max_tokens=4),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= 1


def train_config(corpus_dir, out, **changes):
    settings = dict(model="nano", model_overrides=TRAIN_TINY, tokenizer=str(corpus_dir),
                    data=str(corpus_dir / "data/train.bin"), seq_len=32, batch_size=4, micro_batch_size=2, steps=4,
                    warmup_steps=2, lr=2e-3, out=str(out), save_every=4, eval_every=4, log_every=1,
                    eval_sequences=4, val_fraction=0.1, precision="float32")
    return TrainConfig.load(None, **{**settings, **changes})


def metric_losses(out) -> list[float]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if "loss" in r]


def test_training_on_the_gpu_follows_the_cpu_run(tmp_path):
    """4 float32 optimizer steps (routed experts' backward through grouped_mm, AdamW, clipping) on the GPU give the
    CPU run's losses; a bf16-autocast run trains there too, over float32 master weights."""
    corpus_dir = make_corpus(tmp_path / "corpus")
    Trainer(train_config(corpus_dir, tmp_path / "cpu"), init_distributed("cpu")).train()
    Trainer(train_config(corpus_dir, tmp_path / "gpu"), init_distributed("cuda")).train()
    cpu, gpu = metric_losses(tmp_path / "cpu"), metric_losses(tmp_path / "gpu")
    assert len(gpu) == 4 and gpu == pytest.approx(cpu, rel=1e-4)
    trainer = Trainer(train_config(corpus_dir, tmp_path / "bf16", precision="bfloat16", steps=8),
                      init_distributed("cuda"))
    records = [trainer.train_step(step) for step in range(8)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert {p.device.type for p in trainer.model.parameters()} == {"cuda"}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    final = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "gpu" / "model", dtype=torch.float32)  # saved from GPU
    ids = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(final(ids)).all()


@torch.no_grad()
def test_greedy_continuation_on_the_gpu_equals_the_cpus(saved):
    """The helper's own loop (forward over the latent cache) on both devices: the same tokens in float32."""
    on_cpu = DeepseekV2ForCausalLM.from_pretrained(saved, dtype=torch.float32)
    on_gpu = DeepseekV2ForCausalLM.from_pretrained(saved, dtype=torch.float32, device="cuda")
    prompt = torch.randint(2, 128, (2, 12))
    assert greedy_continuation(on_gpu, prompt.cuda(), 24).tolist() == greedy_continuation(on_cpu, prompt, 24).tolist()


@torch.no_grad()
def test_recorded_decoding_steps_equal_eager_ones(saved):
    """`generate` on the GPU in bf16 records one decoding step as a CUDA graph and replays it
    (`dsv2.model.cuda_graph`): each replayed step's logits equal an eager step's over the same cache contents (to
    bf16's rounding: the replay reads all slots, masked), and the model's Python runs only for the prefill, the
    warm-up and the recording. float32 models decode eagerly."""
    from dsv2.model.cuda_graph import WARMUP_STEPS, GraphedDecodeStep, graphs_apply

    dtype = torch.bfloat16
    model = DeepseekV2ForCausalLM.from_pretrained(saved, dtype=dtype, device="cuda")
    prompt = torch.randint(2, 128, (2, 12), device=CUDA)
    caches = [LatentCache(model.config, 2, 40, dtype=dtype, device="cuda") for _ in range(2)]
    for cache in caches:  # the same prefill in both
        tokens = model(prompt, cache=cache)[:, -1:].argmax(-1)  # [2, 1]
    graphed = GraphedDecodeStep(model, caches[1])
    for position in range(12, 40):
        positions = torch.full((2, 1), position, device=CUDA)
        eager = model(tokens, positions=positions, cache=caches[0])
        replayed = graphed(tokens, positions)
        assert caches[1].seq_len == caches[0].seq_len == position + 1
        assert (replayed - eager).abs().max() <= 0.02 * eager.abs().max(), f"step at position {position}"
        tokens = eager[:, -1:].argmax(-1)
    assert graphed.graph is not None
    with pytest.raises(ValueError, match="latent cache is full"):
        graphed(tokens, positions + 1)

    calls = []
    forward = model.forward
    model.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    replayed = model.generate(prompt, max_new_tokens=40, eos_token_id=[])
    assert len(calls) == 1 + WARMUP_STEPS + 1  # prefill, warm-up, recording: 39 steps replayed
    model.use_cuda_graphs = False
    eager = model.generate(prompt, max_new_tokens=40, eos_token_id=[])
    assert len(calls) == 1 + WARMUP_STEPS + 1 + 40
    assert replayed[:, :16].tolist() == eager[:, :16].tolist()  # the prompt and the first new tokens at least
    assert not graphs_apply(model, caches[0], 40)  # use_cuda_graphs off
    model.use_cuda_graphs = True
    float32 = LatentCache(model.config, 2, 40, dtype=torch.float32, device="cuda")
    assert graphs_apply(model, caches[0], 40) and not graphs_apply(model, float32, 40)


@torch.no_grad()
def test_a_hooked_model_decodes_eagerly_on_the_gpu(saved):
    """A forward hook must see every step; a replayed graph would pass it by, so such a model is not recorded."""
    model = DeepseekV2ForCausalLM.from_pretrained(saved, dtype=torch.bfloat16, device="cuda")
    prompt = torch.randint(2, 128, (1, 10), device=CUDA)
    model.use_cuda_graphs = False
    eager = model.generate(prompt, max_new_tokens=20, eos_token_id=[])
    model.use_cuda_graphs = True
    seen = []
    model.model.layers[1].mlp.register_forward_hook(lambda *_: seen.append(1))
    assert model.generate(prompt, max_new_tokens=20, eos_token_id=[]).tolist() == eager.tolist()
    assert len(seen) == 20  # the prefill and 19 steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_long_contexts_decode_through_the_matmul_attention_on_the_gpu(saved, dtype, monkeypatch):
    """Past LATENT_MATMUL_MIN_KEYS cached rows a GPU step attends with `latent_matmul_attention`: the steps' logits
    equal the full forward's (float32), and stay as close to the float32 model as the bf16 forward does (bf16)."""
    import dsv2.model.attention as attention_module

    taken = []
    matmul_attention = attention_module.latent_matmul_attention
    monkeypatch.setattr(attention_module, "latent_matmul_attention",
                        lambda *args: taken.append(args[1].shape[1]) or matmul_attention(*args))
    model = DeepseekV2ForCausalLM.from_pretrained(saved, dtype=dtype, device="cuda")
    T = attention_module.LATENT_MATMUL_MIN_KEYS + 100
    ids = torch.randint(2, 128, (2, T + 4), device=CUDA)
    cache = LatentCache(model.config, 2, T + 4, dtype=dtype, device="cuda")
    steps = [model(ids[:, :T], cache=cache)[:, -1]] + [model(ids[:, t:t + 1], cache=cache)[:, -1]
                                                        for t in range(T, T + 3)]
    assert taken == [S for S in (T + 1, T + 2, T + 3) for _ in range(model.config.num_hidden_layers)]  # not prefill
    cached, full = torch.stack(steps, dim=1), model(ids[:, :T + 3])[:, T - 1:T + 3]
    if dtype == torch.float32:
        assert (cached - full).abs().max() <= 1e-4
        return
    exact = DeepseekV2ForCausalLM.from_pretrained(saved, dtype=torch.float32, device="cuda")(ids[:, :T + 3])
    exact = exact[:, T - 1:T + 3]

    def distance(logits: torch.Tensor) -> float:
        return ((logits - exact).abs().mean() / exact.abs().mean()).item()

    assert distance(cached) <= 1.5 * distance(full) + 1e-3
