"""`LLM`: vLLM's offline API over dsv2's engine. Programs written for vLLM run with only the import changed."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dsv2.config import parse_dtype
from dsv2.engine.data_parallel import DataParallelEngine
from dsv2.engine.engine import EngineConfig, LLMEngine, RequestOutput
from dsv2.engine.runner import PagedLatentCache
from dsv2.generation_config import GenerationConfig
from dsv2.model import DeepseekV2ForCausalLM
from dsv2.sampling import SamplingParams
from dsv2.tokenizer import Tokenizer

log = logging.getLogger("dsv2.engine")

CPU_CACHE_CAP = 4 * 2**30  # like vLLM's CPU backend default (VLLM_CPU_KVCACHE_SPACE=4)
# vLLM arguments that have no meaning here; accepted so that vLLM programs run unchanged.
IGNORED = {"trust_remote_code", "enforce_eager", "tokenizer_mode", "swap_space", "cpu_offload_gb",
           "revision", "tokenizer_revision", "download_dir", "disable_custom_all_reduce",
           "distributed_executor_backend", "max_seq_len_to_capture", "disable_log_stats", "compilation_config",
           "served_model_name", "skip_tokenizer_init", "disable_async_output_proc", "tokenizer_pool_size"}
# The checkpoint's generation_config.json fields that vLLM takes as the default SamplingParams (where they differ
# from transformers' defaults), with SamplingParams' names.
DEFAULT_SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
# vLLM arguments accepted with only the value that means what dsv2 does; another value raises.
# (Other values would change the weights, the model or what it is run for: quantized or random weights, edited
# config fields, pooling.)
ONLY = {"pipeline_parallel_size": (1,), "kv_cache_dtype": ("auto",), "enable_lora": (False,),
        "speculative_config": (None,), "quantization": (None,), "load_format": ("auto", "safetensors"),
        "hf_overrides": (None, {}), "task": ("auto", "generate"), "runner": ("auto", "generate"),
        "logprobs_mode": ("raw_logprobs",), "enable_sleep_mode": (False,)}


UseTqdm = bool | Callable[..., tqdm]  # as vLLM: whether to show a progress bar, or the tqdm class to show it with


def _available_cpu_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 * 2**30


def cache_budget(device: torch.device, kv_cache_memory: int | None, gpu_memory_utilization: float) -> int:
    """Bytes for the latent cache: ``kv_cache_memory`` if given; on CUDA, the share ``gpu_memory_utilization`` of
    the device's memory left after the weights; on CPU, half that share of the available RAM, at most 4 GiB."""
    if kv_cache_memory is not None:
        return int(kv_cache_memory)
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        activations = int(0.05 * total)
        return max(0, int(total * gpu_memory_utilization) - (total - free) - activations)
    return min(CPU_CACHE_CAP, int(_available_cpu_memory() * gpu_memory_utilization / 2))


def _token_list(ids: Any, what: str = "prompt_token_ids") -> list[int]:
    """Token ids as a list, also from what transformers 5's apply_chat_template returns (a BatchEncoding); a
    TypeError naming ``what`` for anything but integers."""
    if isinstance(ids, Mapping) and "input_ids" in ids:
        ids = ids["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"{what} must be a list of token ids (integers), got {type(ids).__name__}")
    ids = list(ids)
    wrong = [i for i in ids if not isinstance(i, numbers.Integral) or isinstance(i, bool)]
    if wrong:
        raise TypeError(f"{what} must hold token ids (integers), got {wrong[0]!r} ({type(wrong[0]).__name__})")
    return [int(i) for i in ids]


def _one_prompt(ids: Any) -> bool:
    """Whether ``prompt_token_ids`` is one prompt's ids (a flat list, a 1-d tensor or array), not a list of them."""
    if getattr(ids, "ndim", None) is not None:  # a tensor or an array: [T] is one prompt, [B, T] several
        return ids.ndim == 1
    return len(ids) > 0 and isinstance(ids[0], numbers.Integral)


# A prompt dict's keys besides the text and the ids that change nothing here (vLLM's cache_salt only keeps requests
# from sharing prefix-cache blocks). Others (multi_modal_data, prompt_embeds, ...) are refused, not ignored.
HARMLESS_PROMPT_KEYS = {"cache_salt"}


def _check_prompt_dict(prompt: dict, i: int) -> None:
    extra = [k for k, v in prompt.items() if k not in ("prompt", "prompt_token_ids", *HARMLESS_PROMPT_KEYS)
             and v is not None and not (isinstance(v, dict) and not v)]
    if extra:
        raise ValueError(f"prompts[{i}][{extra[0]!r}] is not supported: dsv2 serves text ('prompt') or token ids "
                         "('prompt_token_ids') only")
    if "prompt" in prompt and "prompt_token_ids" not in prompt and not isinstance(prompt["prompt"], str):
        raise TypeError(f"prompts[{i}]['prompt'] must be a string, got {type(prompt['prompt']).__name__}")


def _text_content(conversation: Sequence[Any]) -> list[Any]:
    """The messages with OpenAI-style content parts ([{"type": "text", "text": ...}, ...]) joined into one string by
    newlines, as vLLM's "string" content format renders them for a template that reads strings."""
    messages = []
    for j, message in enumerate(conversation):
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            texts = []
            for k, part in enumerate(content):
                if isinstance(part, str):
                    texts.append(part)
                elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                else:
                    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                    raise ValueError(f"messages[{j}]['content'][{k}]: only text parts ({{'type': 'text', 'text': "
                                     f"...}}) are supported, got {kind!r}")
            message = {**message, "content": "\n".join(texts)}
        messages.append(message)
    return messages


def _not_offered(method: str) -> None:
    raise NotImplementedError(f"LLM.{method}() is not offered by dsv2: it serves text generation only "
                              "(LLM.generate, LLM.chat); prompt_logprobs give the prompt's log-probabilities")


def _no_lora(lora_request: Any) -> None:
    if lora_request is not None:
        raise ValueError("lora_request: dsv2 serves no LoRA adapters (pass None)")


class LLM:
    """Offline batched generation: ``LLM(model=path).generate(prompts, SamplingParams(...))``.

    Over several devices: ``tensor_parallel_size=W`` cuts every layer W ways (``enable_expert_parallel``: whole
    routed experts per device); ``data_parallel_size=W`` gives every device its own requests and latent cache
    (attention data parallel; ``enable_expert_parallel``: E/W routed experts per device, else whole replicas)."""

    def __init__(self, model: str | Path | None = None, tokenizer: str | Path | None = None,
                 tensor_parallel_size: int = 1, dtype: str | torch.dtype = "auto", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, kv_cache_memory: int | None = None, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 device: str | torch.device | None = None, enable_expert_parallel: bool = False,
                 data_parallel_size: int = 1, seed: int | None = None, max_logprobs: int = 20,
                 generation_config: str | Path = "auto", override_generation_config: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        unknown = set(kwargs) - IGNORED - set(ONLY)
        if unknown:
            raise TypeError(f"LLM() got unexpected arguments: {', '.join(sorted(unknown))}")
        for name, allowed in ONLY.items():
            if name in kwargs and kwargs[name] not in allowed:
                raise ValueError(f"LLM({name}={kwargs[name]!r}) is not supported: only {allowed[0]!r}")
        from dsv2.bundled import resolve_model

        path = resolve_model(model)  # the bundled model when none is given
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = parse_dtype(dtype)

        def num_blocks_for(config, cache_dtype: torch.dtype) -> int:
            nonlocal max_model_len
            per_token = PagedLatentCache.bytes_per_token(config, cache_dtype)
            capacity = cache_budget(device, kv_cache_memory, gpu_memory_utilization) // (per_token * block_size)
            if max_model_len is None:
                max_model_len = min(config.max_position_embeddings, capacity * block_size)
            useful = max_num_seqs * -(-max_model_len // block_size)  # more blocks than this would never be used
            return max(1, min(capacity, useful))

        sizes = {"tensor_parallel_size": tensor_parallel_size, "data_parallel_size": data_parallel_size,
                 "max_num_seqs": max_num_seqs, "block_size": block_size, "max_logprobs": max_logprobs}
        if max_model_len is not None:
            sizes["max_model_len"] = max_model_len
        for name, size in sizes.items():
            if not isinstance(size, int) or isinstance(size, bool) or size < (0 if name == "max_logprobs" else 1):
                raise ValueError(f"{name}={size!r} must be an integer >= {0 if name == 'max_logprobs' else 1}")
        if tensor_parallel_size > 1 and data_parallel_size > 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} with data_parallel_size="
                             f"{data_parallel_size}: combining the two is not supported; choose one")
        world = max(tensor_parallel_size, data_parallel_size)
        self.group = None
        if world > 1:
            from dsv2.parallel.group import ParallelGroup

            self.group = ParallelGroup(path, world, enable_expert_parallel, dtype, device, num_blocks_for,
                                       block_size=block_size, data_parallel=data_parallel_size > 1)
            self.model, num_blocks = self.group.model, self.group.num_blocks
            self.model.generation_config = GenerationConfig.from_pretrained(path)
            if (Path(path) / "tokenizer.json").exists():
                self.model.tokenizer = Tokenizer.from_pretrained(path)
        else:
            self.model = DeepseekV2ForCausalLM.from_pretrained(path, dtype=dtype, device=device)
            num_blocks = num_blocks_for(self.model.config, self.model.dtype)
        self.tokenizer = Tokenizer.from_pretrained(tokenizer) if tokenizer else self.model.tokenizer
        self.default_sampling_params = self._sampling_defaults(generation_config, override_generation_config or {})
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 4096 if enable_chunked_prefill else max(4096, max_model_len)
        engine_config = EngineConfig(
            num_blocks=num_blocks, block_size=block_size, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
            enable_chunked_prefill=enable_chunked_prefill, max_logprobs=max_logprobs, seed=seed,
        )
        self.engine: LLMEngine | DataParallelEngine
        if data_parallel_size > 1:
            self.engine = DataParallelEngine(self.model, self.tokenizer, engine_config, self.group)
        else:
            self.engine = LLMEngine(self.model, self.tokenizer, engine_config,
                                    runner_factory=self.group.make_runner if self.group else None)
        per_token = PagedLatentCache.bytes_per_token(self.model.config, self.model.dtype)
        log.info("latent cache: %d blocks × %d tokens × %d bytes = %.2f GiB per rank; max_model_len %d", num_blocks,
                 block_size, per_token, num_blocks * block_size * per_token / 2**30, max_model_len)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the parallel workers, if any (also done at exit)."""
        if self.group is not None:
            self.group.close()

    def __del__(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:
            with contextlib.suppress(Exception):  # at interpreter shutdown the workers exit with their parent anyway
                group.close()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` and ``chat`` sample with when given no SamplingParams: vLLM's defaults, with the
        checkpoint's generation_config.json settings (temperature, top_p, top_k, min_p, repetition_penalty, and
        max_new_tokens as max_tokens) where they differ from transformers' defaults, as vLLM takes them; plain
        SamplingParams() with ``LLM(generation_config="vllm")``."""
        return dataclasses.replace(self.default_sampling_params)

    def _sampling_defaults(self, generation_config: str | Path, overrides: dict[str, Any]) -> SamplingParams:
        """The default SamplingParams: the generation config's sampling fields (none with "vllm"), then
        ``overrides`` (vLLM's override_generation_config, generation_config.json's names) over them."""
        changes = {}
        if generation_config != "vllm":
            config = (self.model.generation_config if generation_config == "auto"
                      else GenerationConfig.from_pretrained(generation_config))
            plain = GenerationConfig()
            changes = {ours: getattr(config, theirs) for theirs, ours in DEFAULT_SAMPLING_FIELDS.items()
                       if getattr(config, theirs) != getattr(plain, theirs)}
        if not isinstance(overrides, Mapping):
            raise TypeError(f"override_generation_config must be a dict, got {type(overrides).__name__}")
        unused = sorted(set(overrides) - set(DEFAULT_SAMPLING_FIELDS))
        if unused:
            log.warning("override_generation_config: %s ignored (as vLLM: only %s set the defaults)",
                        ", ".join(unused), ", ".join(DEFAULT_SAMPLING_FIELDS))
        changes |= {DEFAULT_SAMPLING_FIELDS[k]: v for k, v in overrides.items() if k in DEFAULT_SAMPLING_FIELDS
                    and v is not None}
        try:
            return SamplingParams(**changes)
        except ValueError as e:
            source = "generation_config.json" + (" and override_generation_config" if overrides else "")
            raise ValueError(f"{source}: the sampling defaults {changes}: {e}") from None

    # ------------------------------------------------------------------------------------------------ generation
    def generate(self, prompts: Any = None, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 prompt_token_ids: Sequence[Sequence[int]] | Sequence[int] | None = None, use_tqdm: UseTqdm = True,
                 lora_request: None = None, priority: Sequence[int] | None = None,
                 desc: str = "Processed prompts") -> list[RequestOutput]:
        """Generate for every prompt (strings, {"prompt_token_ids": [...]} / {"prompt": ...} dicts, or the
        ``prompt_token_ids`` argument); the results come back in input order. ``desc`` labels the progress bar.
        vLLM's ``lora_request`` (no adapters here: None only) and ``priority`` (all are served) are accepted."""
        _no_lora(lora_request)
        requests = self._normalize_prompts(prompts, prompt_token_ids)
        params = self._normalize_params(sampling_params, len(requests))
        return self._run(requests, params, use_tqdm, desc)

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: UseTqdm = True,
             lora_request: None = None, chat_template: str | None = None, chat_template_content_format: str = "auto",
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, rendered with the model's chat template (or
        ``chat_template``, given ``chat_template_kwargs`` as extra template variables); ``continue_final_message``
        leaves the last (assistant) message open, to be continued. A message's content is a string, or (as vLLM's
        "auto" and "string" ``chat_template_content_format``) OpenAI-style text parts, joined by newlines; "openai"
        hands the parts to the template as they are."""
        _no_lora(lora_request)
        if chat_template_content_format not in ("auto", "string", "openai"):
            raise ValueError(f"chat_template_content_format={chat_template_content_format!r}: must be 'auto', "
                             "'string' or 'openai'")
        tokenizer = self._require_tokenizer("chat()")
        if chat_template is not None:
            tokenizer = tokenizer.with_chat_template(chat_template)
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if chat_template_content_format != "openai":
            conversations = [_text_content(c) for c in conversations]
        requests = [(None, tokenizer.apply_chat_template(list(c), add_generation_prompt=add_generation_prompt,
                                                         continue_final_message=continue_final_message,
                                                         **(chat_template_kwargs or {})))
                    for c in conversations]
        return self._run(requests, self._normalize_params(sampling_params, len(requests)), use_tqdm)

    # vLLM's pooling and beam-search entry points: a clear error instead of an AttributeError.
    def encode(self, *args: Any, **kwargs: Any) -> None:
        _not_offered("encode")

    def embed(self, *args: Any, **kwargs: Any) -> None:
        _not_offered("embed")

    def classify(self, *args: Any, **kwargs: Any) -> None:
        _not_offered("classify")

    def score(self, *args: Any, **kwargs: Any) -> None:
        _not_offered("score")

    def reward(self, *args: Any, **kwargs: Any) -> None:
        _not_offered("reward")

    def beam_search(self, *args: Any, **kwargs: Any) -> None:
        _not_offered("beam_search")

    def _require_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer: the model folder has no tokenizer.json (pass tokenizer=...)")
        return self.tokenizer

    def _normalize_prompts(self, prompts: Any, prompt_token_ids: Any) -> list[tuple[str | None, list[int]]]:
        if prompt_token_ids is not None:
            if prompts is not None:
                raise ValueError("generate() got both prompts and prompt_token_ids: give one of them (or dicts "
                                 "{'prompt': text, 'prompt_token_ids': ids} as prompts)")
            token_lists = [prompt_token_ids] if _one_prompt(prompt_token_ids) else prompt_token_ids
            return [(None, _token_list(ids, f"prompt_token_ids[{i}]")) for i, ids in enumerate(token_lists)]
        if prompts is None:
            raise ValueError("generate() needs prompts or prompt_token_ids")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a string, a dict or a list of them, got {type(prompts).__name__}")
        requests = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, dict):
                _check_prompt_dict(prompt, i)
            if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
                requests.append((prompt.get("prompt"),
                                 _token_list(prompt["prompt_token_ids"], f"prompts[{i}]['prompt_token_ids']")))
            elif isinstance(prompt, dict) and "prompt" in prompt:
                requests.append((prompt["prompt"], self._require_tokenizer("text prompts").encode(prompt["prompt"])))
            elif isinstance(prompt, str):
                requests.append((prompt, self._require_tokenizer("text prompts").encode(prompt)))
            else:
                raise TypeError(f"a prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', got "
                                f"{type(prompt).__name__}")
        return requests

    def _normalize_params(self, params: SamplingParams | Sequence[SamplingParams] | None,
                          count: int) -> list[SamplingParams]:
        if params is None:
            return [self.get_default_sampling_params()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        if not isinstance(params, Sequence) or isinstance(params, str):
            raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got {type(params).__name__}")
        params = list(params)
        wrong = [i for i, p in enumerate(params) if not isinstance(p, SamplingParams)]
        if wrong:
            raise TypeError(f"sampling_params[{wrong[0]}] must be a SamplingParams, got "
                            f"{type(params[wrong[0]]).__name__}")
        if len(params) != count:
            raise ValueError(f"{len(params)} sampling_params for {count} prompts: give one, or one per prompt")
        return params

    def _run(self, requests: list[tuple[str | None, list[int]]], params: list[SamplingParams],
             use_tqdm: UseTqdm, desc: str = "Processed prompts") -> list[RequestOutput]:
        for i, ((_, token_ids), p) in enumerate(zip(requests, params, strict=True)):  # all or nothing is queued
            try:
                self.engine.check_request(token_ids, p)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        ids = [str(next(self._ids)) for _ in requests]
        added = []
        try:
            for request_id, (prompt, token_ids), p in zip(ids, requests, params, strict=True):
                self.engine.add_request(request_id, token_ids, p, prompt)
                added.append(request_id)
            return self._collect(ids, use_tqdm, desc)
        except BaseException:  # an error or an interrupt: leave no request of this call behind in the engine
            for request_id in added:
                self.engine.abort_request(request_id)
            raise

    def _collect(self, ids: list[str], use_tqdm: UseTqdm, desc: str) -> list[RequestOutput]:
        """Step the engine until every request in ``ids`` has finished; their outputs, in the order of ``ids``."""
        wanted = set(ids)
        results: dict[str, RequestOutput] = {}
        generated = 0
        progress = use_tqdm if callable(use_tqdm) else tqdm  # vLLM's use_tqdm may be the progress bar's class
        with progress(total=len(ids), desc=desc, disable=not use_tqdm, unit="req") as bar:
            while len(results) < len(ids):
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError(f"the engine stopped with {len(ids) - len(results)} requests unanswered")
                for output in self.engine.step():
                    if output.finished and output.request_id in wanted:
                        results[output.request_id] = output
                        generated += sum(len(o.token_ids) for o in output.outputs)
                        bar.update(1)
                        bar.set_postfix_str(f"output {generated / max(bar.format_dict['elapsed'], 1e-9):.1f} tok/s")
        return [results[i] for i in ids]
