"""dsv2 as an lm-evaluation-harness model ("dsv2"): log-likelihoods and generations through dsv2's engine.

lm-eval finds models in its registry, which this module fills when imported. From Python::

    import dsv2.eval.lm_eval  # registers "dsv2"
    lm_eval.simple_evaluate(model="dsv2", model_args="pretrained=PATH", tasks=[...])

From the shell, the harness's own command line with the model registered first::

    python -m dsv2.eval.lm_eval --model dsv2 --model_args pretrained=PATH --tasks ...   # = lm_eval ...
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dsv2.engine.llm import LLM
from dsv2.eval.runner import loglikelihoods
from dsv2.sampling import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64  # sequences the engine runs together unless asked otherwise


def engine_batch_size(batch_size: int | str | None = None, max_batch_size: int | str | None = None,
                      max_num_seqs: int | str | None = None) -> int:
    """The engine's max_num_seqs for lm-eval's batch settings. The engine batches continuously (requests join and
    leave the running batch at every step), so a batch size is a cap on the sequences run together, never a
    chunking of the requests: ``max_num_seqs`` if given; else lm-eval's ``max_batch_size`` if given; else
    ``batch_size`` when it is 2 or more; else (``"auto"``, ``"auto:N"``, None, or 1, the value lm-eval's command
    line passes when --batch_size is left out) ``DEFAULT_BATCH_SIZE``. ``max_num_seqs=1`` runs one at a time."""
    def count(name: str, value: int | str) -> int:
        text = str(value).strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"the dsv2 lm-eval model: {name}={value!r} is not a positive integer"
                             + (" or 'auto'" if name == "batch_size" else ""))
        return int(text)

    if max_num_seqs is not None:
        return count("max_num_seqs", max_num_seqs)
    if max_batch_size is not None:
        return count("max_batch_size", max_batch_size)
    if batch_size is None or str(batch_size).strip().startswith("auto"):
        return DEFAULT_BATCH_SIZE
    size = count("batch_size", batch_size)
    return size if size > 1 else DEFAULT_BATCH_SIZE


def engine_device(device: str | None) -> str | None:
    """As lm-eval's HFLM does: a CUDA device asked for (lm-eval's default is "cuda:0") where CUDA is not available
    falls back to the CPU, with a warning. None: the engine's choice (CUDA when available)."""
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("dsv2 lm-eval model: device %r asked for, but CUDA is not available: using the CPU", device)
        return "cpu"
    return device


@register_model("dsv2")
class DSV2LM(LM):
    """``model_args``: pretrained (a checkpoint folder; default the bundled model), dtype, max_model_len,
    kv_cache_memory, max_num_seqs, device. lm-eval's own --batch_size, --max_batch_size and --device arrive as
    batch_size, max_batch_size and device: see `engine_batch_size` (lm-eval's default batch size of 1 and "auto"
    mean the adapter's default, 64 sequences run together; ``max_num_seqs=1`` runs one at a time) and
    `engine_device` (a CUDA device without CUDA means the CPU)."""

    def __init__(self, pretrained: str | None = None, dtype: str = "auto", max_model_len: int | None = None,
                 kv_cache_memory: int | None = None, batch_size: int | str | None = None,
                 max_batch_size: int | str | None = None, max_num_seqs: int | str | None = None,
                 device: str | None = None, **ignored: Any) -> None:
        super().__init__()
        if ignored:  # a misspelt model_arg would otherwise pass unnoticed
            logger.warning("dsv2 lm-eval model: ignoring model_args it does not take: %s", ", ".join(sorted(ignored)))
        max_num_seqs = engine_batch_size(batch_size, max_batch_size, max_num_seqs)  # bad values: before loading
        self.llm = LLM(model=pretrained, dtype=dtype, max_model_len=max_model_len, kv_cache_memory=kv_cache_memory,
                       max_num_seqs=max_num_seqs, device=engine_device(device))
        if self.llm.tokenizer is None:
            raise ValueError("the dsv2 lm-eval model needs the checkpoint's tokenizer.json")
        self.tokenizer = self.llm.tokenizer
        self.max_length = self.llm.engine.config.max_model_len
        self.pretrained = str(pretrained or "dsv2-bundled")

    @property
    def tokenizer_name(self) -> str:
        """lm-eval's name for the chat format (keys its request cache under --apply_chat_template)."""
        return self.pretrained.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The checkpoint's chat template (recorded in lm-eval's results) when lm-eval applies one, else ""."""
        return self.tokenizer.chat_template if chat_template else ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's --apply_chat_template: the conversation as the checkpoint's chat format renders it, BOS written
        by the template (and so not added a second time when the text is encoded)."""
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    @property
    def bos(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As lm-eval's own models do: trailing spaces of the context belong to the continuation."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.tokenizer.encode(context) if context else [self.bos]
        return context_ids, self.tokenizer.encode(continuation, add_special_tokens=False)

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Keep the end of an over-long context so prompt + continuation fit max_model_len."""
        room = self.max_length - 1 - len(continuation)
        return (context[-room:] if room > 0 else context[-1:]), continuation[-(self.max_length - 2):]

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._fit(*self._encode_pair(*request.args)) for request in requests]
        return loglikelihoods(self.llm, pairs, "loglikelihood", use_tqdm=not disable_tqdm)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for n, request in enumerate(requests):
            ids = self.tokenizer.encode(request.args[0], add_special_tokens=False)
            # windows of at most max_length - 1 tokens: the engine scores a prompt shorter than max_model_len
            for window in get_rolling_token_windows(ids, self.bos, self.max_length - 2, 1):
                windows.append(make_disjoint_window(window))
                owners.append(n)
        scores = loglikelihoods(self.llm, windows, "loglikelihood_rolling", use_tqdm=not disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores, strict=True):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        prompts, params = [], []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = 0.0 if not kwargs.get("do_sample", False) else float(kwargs.get("temperature", 1.0))
            max_tokens = min(int(kwargs.get("max_gen_toks", 256)), self.max_length - 2)
            ids = self.tokenizer.encode(context)[-(self.max_length - max_tokens):]  # the context's end, with room
            prompts.append(ids)
            params.append(SamplingParams(temperature=temperature, max_tokens=max_tokens, stop=until or None))
        outputs = self.llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=not disable_tqdm)
        return [out.outputs[0].text for out in outputs]


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
