"""Reference generation: prefill, then decode one token per step over a contiguous latent cache.

Prompts of different lengths run as one ragged batch: right-padded, each row at its own positions (the cache masks by
position, so padding is never attended). Prefill goes through the expanded attention path, decoding through the
absorbed one. `generate` mirrors transformers' (ids in, ids out, greedy by default); `stream` yields text deltas.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from dsv2.detokenize import IncrementalDetokenizer
from dsv2.generation_config import GenerationConfig
from dsv2.model import DeepseekV2ForCausalLM, LatentCache
from dsv2.model.cuda_graph import GraphedDecodeStep, graphs_apply
from dsv2.sampling import SamplingParams, SamplingRow, greedy_tokens, plainly_greedy, sample
from dsv2.tokenizer import Tokenizer


def sampling_params(max_new_tokens: int = 128, do_sample: bool | None = None, temperature: float | None = None,
                    top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: int | None = None,
                    stop_token_ids: Sequence[int] | None = None, stop_strings: str | Sequence[str] | None = None,
                    ignore_eos: bool = False) -> SamplingParams:
    """transformers-style keyword arguments → SamplingParams. Greedy unless ``do_sample`` or a temperature > 0
    (``do_sample=False`` or ``temperature=0`` forces greedy)."""
    if do_sample is False or temperature == 0 or (do_sample is None and temperature is None):
        temperature = 0.0
    elif temperature is None:
        temperature = 1.0
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                          repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                          frequency_penalty=frequency_penalty, seed=seed, max_tokens=max_new_tokens,
                          stop=list([stop_strings] if isinstance(stop_strings, str) else stop_strings or []),
                          stop_token_ids=list(stop_token_ids or []), ignore_eos=ignore_eos)


class TokenStreamer(Protocol):
    """What `generate` hands its tokens to as they come (transformers' BaseStreamer: TextStreamer and its kin)."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


@dataclasses.dataclass
class Step:
    """One decoding step: the token each row drew (-1 for rows already done) and which rows are now done.

    A consumer may set ``done[row] = True`` itself (a stop string in the row's text); the loop then stops that row.
    """

    tokens: list[int]
    done: list[bool]


def decode_steps(model: DeepseekV2ForCausalLM, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 eos_token_ids: Sequence[int] = ()) -> Iterator[Step]:
    """The generation loop shared by `generate` and `stream`: yields each step's tokens until every row is done.

    A row is done after ``params.max_tokens`` tokens, or at an EOS (unless ``ignore_eos``) or a stop token id.
    The model runs without autograd; the caller's grad mode is left as it is between steps.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    config, device = model.config, model.lm_head.weight.device
    lengths = [len(p) for p in prompts]
    max_new = params.max_tokens or config.max_position_embeddings - max(lengths)
    if max(lengths) + max_new > config.max_position_embeddings:
        raise ValueError(f"prompt of {max(lengths)} tokens + max_new_tokens={max_new} exceeds the model's "
                         f"max_position_embeddings={config.max_position_embeddings}")
    B, T = len(prompts), max(lengths)
    cache = LatentCache(config, B, T + max_new, dtype=model.lm_head.weight.dtype, device=device)
    padded = torch.tensor([list(p) + [0] * (T - len(p)) for p in prompts], device=device)  # [B, T], right-padded
    last = torch.tensor(lengths, device=device)[:, None] - 1  # [B, 1] index of each prompt's last token
    logits = _without_grad(model, padded, cache=cache, logits_at=last)  # [B, 1, V]
    positions = last + 1  # [B, 1] where each row's next token goes

    # row i draws from seed + i (as the engine's n samples do): seeded rows of one batch differ, and repeat
    rows = [SamplingRow.start(params if params.seed is None else dataclasses.replace(params, seed=params.seed + i),
                              prompt, device) for i, prompt in enumerate(prompts)]
    stop_ids = params.stop_ids(eos_token_ids)
    done = [False] * B
    chunks = GreedyChunks()
    graphed = GraphedDecodeStep(model, cache) if graphs_apply(model, cache, max_new - 1) else None
    queued: list[list[int]] = []  # the tokens of the last `decode_greedy` call not yet yielded, step by step
    for step in range(max_new):
        if queued:
            drawn = queued.pop(0)
        else:
            tokens = greedy_tokens(logits, rows)  # [B, 1]
            if tokens is None:
                tokens = sample(logits[:, -1], rows, min_p_first=False)[:, None]  # transformers' order
            drawn = [token for (token,) in tokens.tolist()]
        for row, token in enumerate(drawn):
            rows[row].output_ids.append(token)
            if done[row]:
                drawn[row] = -1
            elif token in stop_ids or step == max_new - 1:
                done[row] = True
        yield Step(drawn, done)
        if all(done):
            return
        if queued:
            continue
        started = time.perf_counter()
        steps = chunks.size(max_new - step - 1) if plainly_greedy(rows) else 1
        ahead = None if steps == 1 else model.decode_greedy(
            tokens, positions, cache, steps, stop_ids, [row for row, finished in enumerate(done) if finished])
        if ahead is None:  # [B, 1, V]
            logits = (graphed(tokens, positions) if graphed is not None
                      else _without_grad(model, tokens, positions=positions, cache=cache))
            positions = positions + 1
        else:  # [B, n]: the next n steps' tokens
            queued, tokens = ahead.T.tolist(), ahead[:, -1:]
            positions = positions + ahead.shape[1]
        chunks.record(time.perf_counter() - started, steps, ahead)


class GreedyChunks:
    """How many greedy steps `decode_steps` takes in one `decode_greedy` call (no Python between them: ~0.3 ms a
    step saved, ~5% of a bf16 step of the benchmark model): as many as run in ``CHUNK_SECONDS`` at the last
    measured step time, at most ``MAX_CHUNK``, never more than remain. A stream's text then comes at least every
    ~``CHUNK_SECONDS``; a model whose steps take longer (where the Python between them does not count) takes them
    one at a time. The first step is timed alone; once the model refuses a call (no kernel for the step), every
    step is."""

    CHUNK_SECONDS = 0.05
    MAX_CHUNK = 16

    def __init__(self) -> None:
        self.step_seconds: float | None = None
        self.refused = False

    def size(self, remaining: int) -> int:
        if self.step_seconds is None or self.refused:
            return 1
        return max(1, min(remaining, self.MAX_CHUNK, int(self.CHUNK_SECONDS / max(self.step_seconds, 1e-9))))

    def record(self, seconds: float, asked: int, drawn: torch.Tensor | None) -> None:
        """A call that took ``seconds`` for ``asked`` steps and drew ``drawn`` [B, n] (None: one step of forward)."""
        self.refused = self.refused or (asked > 1 and drawn is None)
        self.step_seconds = seconds / (1 if drawn is None else drawn.shape[1])


def _without_grad(model: DeepseekV2ForCausalLM, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """model(input_ids, **kwargs) without autograd. Grad mode is switched only where it is on: `generate` runs the
    whole loop without it, and each switch costs ~50 µs of a decoding step once the weights' stream has emptied the
    caches (a generator decorated with no_grad switches twice per step). ``return_aux=False``: logits even for a
    model in training mode (whose forward would return a CausalLMOutput), as transformers' generate allows."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return model(input_ids, return_aux=False, **kwargs)
    return model(input_ids, return_aux=False, **kwargs)


def _settings(model: DeepseekV2ForCausalLM, eos_token_id: int | Sequence[int] | None, pad_token_id: int | None,
              kwargs: dict, prompt_length: int) -> tuple[SamplingParams, list[int], int | None]:
    """The model's generation_config (or the call's ``generation_config``) overridden by the call's arguments →
    (params, EOS ids, pad id). As in transformers, an argument of None means "not set". transformers'
    ``max_length`` (prompt included) becomes max_new_tokens, which wins where both are set at the same level (the
    call's arguments beat the config's); ``use_cache`` (always on)
    and ``num_beams=1`` are accepted; other names that `sampling_params` lacks get an error that lists the ones it
    has."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.pop("use_cache", None)
    names = list(inspect.signature(sampling_params).parameters)
    supported = (f"supported: {', '.join(names)}, max_length, eos_token_id, pad_token_id, attention_mask, tokenizer, "
                 "streamer, generation_config, use_cache, num_beams=1")
    num_beams = kwargs.pop("num_beams", None)
    if num_beams not in (None, 1):
        raise ValueError(f"num_beams={num_beams}: beam search is not supported, only greedy decoding or sampling "
                         f"({supported})")
    config = kwargs.pop("generation_config", None) or model.generation_config
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"generation_config must be a dsv2.GenerationConfig, got {type(config).__name__}")
    unknown = sorted(set(kwargs) - set(names) - {"max_length"})
    if unknown:
        raise TypeError(f"generate() got unsupported arguments: {', '.join(unknown)} ({supported})")
    defaults = config.generate_kwargs()
    default_eos, default_pad = defaults.pop("eos_token_id", None), defaults.pop("pad_token_id", None)
    if default_eos is None:  # a generation_config.json without one: the model's own EOS still ends a reply
        default_eos = model.config.eos_token_id
    eos = default_eos if eos_token_id is None else eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    pad = default_pad if pad_token_id is None else pad_token_id
    if "max_length" in kwargs and "max_new_tokens" not in kwargs:  # the call's length beats the config's
        defaults.pop("max_new_tokens", None)
    merged = {**defaults, **kwargs}
    max_length = merged.pop("max_length", None)
    if max_length is not None and merged.get("max_new_tokens") is None:  # as in transformers, max_new_tokens wins
        if max_length <= prompt_length:
            raise ValueError(f"max_length={max_length} leaves no room after the {prompt_length}-token prompt")
        merged["max_new_tokens"] = max_length - prompt_length
    max_new_tokens = merged.get("max_new_tokens")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
    return sampling_params(**merged), eos_ids, pad


@torch.no_grad()
def generate(model: DeepseekV2ForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             tokenizer: Tokenizer | None = None, pad_token_id: int | None = None,
             eos_token_id: int | Sequence[int] | None = None, streamer: TokenStreamer | None = None,
             **kwargs) -> torch.Tensor:
    """transformers-style generate: input_ids [B, T] (left-padded when ``attention_mask`` marks padding) →
    [B, T + new] ids, rows that finish early padded with ``pad_token_id``. Keyword arguments: see `sampling_params`;
    ``stop_strings`` need ``tokenizer`` (the tokens that complete the stop string are kept, as in transformers).
    ``streamer`` (transformers' protocol, e.g. its TextStreamer): ``put(input_ids)`` first, then ``put`` of each
    step's tokens [B] (rows already done: the pad id) as they are drawn, and ``end()``. Greedy steps drawn in one
    call (`GreedyChunks`) reach it together.
    """
    _check_inputs(input_ids, attention_mask)
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    prompts = [row[keep].tolist() for row, keep in zip(input_ids, mask, strict=True)]
    params, eos_ids, pad = _settings(model, eos_token_id, pad_token_id, kwargs, input_ids.shape[1])
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    if params.stop and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to see the text (pass tokenizer=...)")
    detokenizers = [IncrementalDetokenizer(tokenizer, params.stop) for _ in prompts] if params.stop else []
    new_tokens: list[list[int]] = [[] for _ in prompts]
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for step in decode_steps(model, prompts, params, eos_ids):
        if streamer is not None:
            streamer.put(torch.tensor([pad if token < 0 else token for token in step.tokens]))
        for row, token in enumerate(step.tokens):
            if token < 0:
                continue
            new_tokens[row].append(token)
            if detokenizers:
                detokenizers[row].add(token)
                step.done[row] |= detokenizers[row].stopped
    if streamer is not None:
        streamer.end()
    width = max(len(t) for t in new_tokens)
    out = torch.full((len(prompts), width), pad, dtype=torch.long, device=input_ids.device)
    for row, tokens in enumerate(new_tokens):
        out[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return torch.cat([input_ids.long(), out], dim=1)  # int64 whatever the prompt's dtype, as in transformers


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """input_ids: an integer tensor [batch, seq]; attention_mask, where given, of the same shape."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor [batch, seq], got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {shape}")


def stream(model: DeepseekV2ForCausalLM, tokenizer: Tokenizer, prompt: str | Sequence[int] | torch.Tensor,
           skip_special_tokens: bool = True, **kwargs) -> Iterator[str]:
    """Yield the completion of one prompt (text, encoded with BOS, or token ids) as text deltas.

    Deltas never split a UTF-8 character; a stop string ends the stream and is not part of it.
    """
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    else:
        ids_tensor = torch.as_tensor(prompt)
        if ids_tensor.dim() > 1 and ids_tensor.shape[0] != 1:
            raise ValueError(f"stream() takes one prompt; got a batch of {ids_tensor.shape[0]} (use generate)")
        ids = ids_tensor.flatten().tolist()
    kwargs.pop("pad_token_id", None)  # one prompt: nothing to pad
    params, eos_ids, _ = _settings(model, kwargs.pop("eos_token_id", None), None, kwargs, len(ids))
    if not eos_ids and tokenizer.eos_token_id is not None:
        eos_ids = [tokenizer.eos_token_id]
    stop_ids = params.stop_ids(eos_ids)
    detokenizer = IncrementalDetokenizer(tokenizer, params.stop, skip_special_tokens)
    for step in decode_steps(model, [ids], params, eos_ids):
        if step.tokens[0] in stop_ids:  # the token that ends the answer adds no text (as in vLLM and OpenAI)
            break
        delta = detokenizer.add(step.tokens[0])
        if delta:
            yield delta
        if detokenizer.stopped:
            return
    tail = detokenizer.finish()
    if tail:
        yield tail
