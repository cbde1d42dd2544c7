"""Tiny configs, random weights and a greedy decoding loop shared by the tests."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from dsv2 import DeepseekV2ForCausalLM, LatentCache, ModelConfig

YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}

# Lite-shaped: no query compression, greedy routing, one dense layer, YaRN with mscale_all_dim.
# qk_nope (24) ≠ v (16) ≠ rope (8) so that a mixed-up split cannot go unnoticed.
TINY_LITE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, topk_method="greedy",
    n_group=1, topk_group=1, routed_scaling_factor=1.0, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
    qk_rope_head_dim=8, qk_nope_head_dim=24, v_head_dim=16, max_position_embeddings=2560, rope_scaling=YARN,
    bos_token_id=0, eos_token_id=1,
)
# V2-shaped: query compression, group-limited routing over several groups, routed_scaling_factor 16.
TINY_V2 = dict(
    TINY_LITE, q_lora_rank=48, n_routed_experts=16, num_experts_per_tok=3, topk_method="group_limited_greedy",
    n_group=4, topk_group=2, routed_scaling_factor=16.0, n_shared_experts=2,
)


def tiny_config(base: dict = TINY_LITE, **overrides) -> ModelConfig:
    return ModelConfig.from_dict({**base, **overrides})


def randomize_(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that routing, attention and norms all matter (init std 0.02 hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else std * noise)
    return model


def tiny_model(base: dict = TINY_LITE, dtype: torch.dtype = torch.float32, **overrides) -> DeepseekV2ForCausalLM:
    return randomize_(DeepseekV2ForCausalLM.from_config(tiny_config(base, **overrides), dtype=dtype)).eval()


def hf_model(config: dict):
    """transformers' DeepseekV2ForCausalLM (the oracle) for a config dict, random weights (seed 1), set to generate
    full-length continuations."""
    import transformers

    hf = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**config))
    randomize_(hf, seed=1).eval()
    hf.generation_config.eos_token_id = None  # full-length continuations
    hf.generation_config.pad_token_id = 0
    return hf


@torch.no_grad()
def greedy_continuation(model: DeepseekV2ForCausalLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """prompt [B, T] → the next new_tokens ids [B, new_tokens]: prefill, then token by token over a latent cache."""
    cache = LatentCache(model.config, prompt.shape[0], prompt.shape[1] + new_tokens,
                        dtype=model.lm_head.weight.dtype, device=prompt.device)
    logits = model(prompt, cache=cache)
    out = []
    for _ in range(new_tokens):
        next_ids = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        out.append(next_ids)
        logits = model(next_ids, cache=cache)
    return torch.cat(out, dim=1)


CORPUS = [
    "An attention function can be described as mapping a query and a set of key-value pairs to an output.",
    "Write a piece of quicksort code in C++. It sorts the array in place.",
    "深度求索发布了混合专家模型。你好，世界！这是一个测试。",
    "Emoji travel too: 🚀🌍✨ and a pinch of ünïcödé.",
] * 40


def make_tokenizer_files(folder, vocab_size: int = 400, chat_template: str | None = "default") -> None:
    """A byte-level BPE with DeepSeek's special tokens and tokenizer_config.json, laid out like the official folder
    (special tokens written as AddedToken objects, a BOS-adding post-processor as LlamaTokenizerFast saves it)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from dsv2.tokenizer import BOS_TOKEN, DEEPSEEK_V2_CHAT_TEMPLATE, EOS_TOKEN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                                                       special_tokens=[(BOS_TOKEN, tok.token_to_id(BOS_TOKEN))])
    tok.save(str(folder / "tokenizer.json"))

    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": added(BOS_TOKEN),
              "eos_token": added(EOS_TOKEN), "pad_token": added(EOS_TOKEN), "clean_up_tokenization_spaces": False,
              "legacy": True,
              "model_max_length": 16384, "sp_model_kwargs": {}, "unk_token": None,
              "tokenizer_class": "LlamaTokenizerFast"}
    if chat_template is not None:
        config["chat_template"] = DEEPSEEK_V2_CHAT_TEMPLATE if chat_template == "default" else chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


# A two-layer nano model for training tests (vocabulary 512: the test tokenizer's 400 ids, padded).
TRAIN_TINY = {"vocab_size": 512, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
              "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
              "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
              "max_position_embeddings": 256}


def make_corpus(root: Path) -> Path:
    """A tokenizer folder and a tokenized corpus of 30 documents (root/data/train.bin). → root."""
    from dsv2.train.data import tokenize_files

    root.mkdir(parents=True, exist_ok=True)
    make_tokenizer_files(root)
    files = []
    for i in range(30):
        path = root / f"doc{i:02d}.txt"
        path.write_text(" ".join(CORPUS[i % 4: i % 4 + 6]), encoding="utf-8")
        files.append(path)
    tokenize_files(root, files, root / "data" / "train.bin", workers=2)
    return root


@torch.no_grad()
def tiny_checkpoint(folder, base: dict = TINY_LITE, **overrides) -> Path:
    """A checkpoint folder as the official ones look: a tiny random model (vocabulary 512, padded past the
    tokenizer's 400 ids) with config.json, safetensors and the test tokenizer. → the folder."""
    tiny_model(base, **{"vocab_size": 512, **overrides}).save_pretrained(folder)
    make_tokenizer_files(folder)
    return Path(folder)


def free_port() -> int:
    """A loopback TCP port nobody listens on (for a test server or a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_eos_prone_(model: DeepseekV2ForCausalLM, strength: float = 5.0) -> DeepseekV2ForCausalLM:
    """Point the EOS row of the output head along the model's typical final hidden state, so that sampled answers
    end after a token or two (a random model otherwise rambles until max_tokens)."""
    eos = model.config.eos_token_id
    hidden = []
    model.lm_head.register_forward_hook(lambda module, args, out: hidden.append(args[0].detach()))
    with torch.no_grad():
        model(torch.randint(2, model.config.vocab_size, (4, 32)))
        model.lm_head._forward_hooks.clear()
        mean = torch.cat(hidden).flatten(0, -2).float().mean(0)  # [H]
        model.lm_head.weight[eos] = (strength * mean / mean.square().sum()).to(model.lm_head.weight.dtype)
    return model


def record_batches(llm) -> list:
    """Every batch an `LLM`'s scheduler hands out from now on (its `schedule` wrapped); a batch's items keep the
    token range they were scheduled for."""
    batches = []
    scheduler = llm.engine.scheduler
    schedule = scheduler.schedule

    def recording():
        batch = schedule()
        if batch is not None:
            batches.append(batch)
        return batch

    scheduler.schedule = recording
    return batches


def prefill_tokens(batches: list) -> list[int]:
    """The tokens each recorded prefill batch computed (its chunks' lengths, without padding)."""
    return [sum(item.end - item.start for item in b.items) for b in batches if b.is_prefill]
