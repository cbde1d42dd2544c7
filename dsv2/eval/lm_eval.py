"""dsv2 as an lm-evaluation-harness model ("dsv2"): log-likelihoods and generations through dsv2's engine.

lm-eval finds models in its registry, which this module fills when imported. From Python::

    import dsv2.eval.lm_eval  # registers "dsv2"
    lm_eval.simple_evaluate(model="dsv2", model_args="pretrained=PATH", tasks=[...])

From the shell, the harness's own command line with the model registered first::

    python -m dsv2.eval.lm_eval --model dsv2 --model_args pretrained=PATH --tasks ...   # = lm_eval ...
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dsv2.engine.llm import LLM
from dsv2.eval.runner import loglikelihoods
from dsv2.sampling import SamplingParams


@register_model("dsv2")
class DSV2LM(LM):
    """``model_args``: pretrained (a checkpoint folder; default the bundled model), dtype, max_model_len,
    kv_cache_memory, batch_size (sequences in a batch), device."""

    def __init__(self, pretrained: str | None = None, dtype: str = "auto", max_model_len: int | None = None,
                 kv_cache_memory: int | None = None, batch_size: int | str = 64, device: str | None = None,
                 **ignored: Any) -> None:
        super().__init__()
        self.llm = LLM(model=pretrained, dtype=dtype, max_model_len=max_model_len, kv_cache_memory=kv_cache_memory,
                       max_num_seqs=int(batch_size) if str(batch_size).isdigit() else 64, device=device)
        if self.llm.tokenizer is None:
            raise ValueError("the dsv2 lm-eval model needs the checkpoint's tokenizer.json")
        self.tokenizer = self.llm.tokenizer
        self.max_length = self.llm.engine.config.max_model_len

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
