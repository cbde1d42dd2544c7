"""A randomized differential test of the engine against the reference `generate`: greedy outputs must agree token for
token whatever the batch, the cache size, prefix-cache hits, chunked prefill, preemption or aborts of other requests;
every block comes back, and the prefix cache holds nothing stale."""

import random

import pytest
import torch

from dsv2 import LLM, DeepseekV2ForCausalLM, SamplingParams
from dsv2.detokenize import IncrementalDetokenizer
from dsv2.generate import generate

from helpers import TINY_LITE, tiny_checkpoint

BLOCK = 8
PER_TOKEN = 3 * 40 * 4  # tiny config: 3 layers × (32 + 8) latent values × fp32
MAX_LEN = 64
EOS = 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("lite"), TINY_LITE)


class Reference:
    """What one request alone must produce: greedy `generate` (one sequence, no batching, no paging), with the engine's
    stopping rules (EOS, stop_token_ids, stop strings, min_tokens, max_tokens) applied to its tokens."""

    def __init__(self, checkpoint) -> None:
        self.model = DeepseekV2ForCausalLM.from_pretrained(checkpoint)
        self.free_runs: dict[tuple[int, ...], list[int]] = {}

    def free_run(self, prompt: list[int], n: int) -> list[int]:
        """The first ``n`` greedy tokens after ``prompt``, EOS ignored."""
        have = self.free_runs.get(tuple(prompt), [])
        if len(have) < n:
            ids = generate(self.model, torch.tensor([prompt]), max_new_tokens=n, ignore_eos=True)
            have = self.free_runs[tuple(prompt)] = ids[0, len(prompt):].tolist()
        return have[:n]

    @torch.no_grad()
    def __call__(self, prompt: list[int], params: SamplingParams, tokenizer) -> tuple[list[int], str]:
        """→ (output token ids, finish reason)."""
        stops = params.stop_ids({EOS})
        tokens: list[int] = []
        while params.min_tokens and len(tokens) < params.min_tokens:  # stop ids barred: one full forward a token
            logits = self.model(torch.tensor([prompt + tokens]))[0, -1]
            logits[list(stops)] = float("-inf")
            tokens.append(int(logits.argmax()))
        tokens += self.free_run(prompt + tokens, params.max_tokens - len(tokens))
        detokenizer = (IncrementalDetokenizer(tokenizer, params.stop, include_stop=params.include_stop_str_in_output)
                       if params.stop else None)
        for n, token in enumerate(tokens, start=1):
            if detokenizer is not None and (token not in stops or params.include_stop_str_in_output):
                detokenizer.add(token, look_for_stop=n >= params.min_tokens)
            if token in stops or (detokenizer is not None and detokenizer.stopped):
                return tokens[:n], "stop"
        return tokens, "length"


@pytest.fixture(scope="module")
def reference(checkpoint):
    return Reference(checkpoint)


def random_requests(rng: random.Random, count: int, reference: Reference,
                    tokenizer) -> list[tuple[list[int], SamplingParams]]:
    """Prompts of 1 to 3 blocks, most sharing one of a few prefixes (some whole prompts repeat, some continue an
    earlier prompt with its own answer), with various lengths and stopping rules."""
    prefixes = [[rng.randrange(2, 400) for _ in range(rng.randrange(1, 3 * BLOCK))] for _ in range(4)]
    requests = []
    for _ in range(count):
        if requests and rng.random() < 0.15:  # an earlier prompt with its answer: blocks that hold output tokens
            prompt, params = rng.choice(requests)
            prompt = (prompt + reference(prompt, params, tokenizer)[0])[: 3 * BLOCK + 4]
        elif requests and rng.random() < 0.1:  # the very same prompt again
            prompt = list(rng.choice(requests)[0])
        else:
            prefix = rng.choice(prefixes) if rng.random() < 0.7 else []
            tail = [rng.randrange(2, 400) for _ in range(rng.randrange(0 if prefix else 1, BLOCK + 3))]
            prompt = (prefix + tail)[: 3 * BLOCK + 2]
        max_tokens = rng.randrange(1, min(24, MAX_LEN - len(prompt)))
        settings = dict(temperature=0, max_tokens=max_tokens, ignore_eos=rng.random() < 0.5)
        free = reference.free_run(prompt, max_tokens)
        kind = rng.random()
        if kind < 0.25:
            settings["stop_token_ids"] = [rng.choice(free)]
        elif kind < 0.4 and len(text := tokenizer.decode(free, skip_special_tokens=True)) > 3:
            at = rng.randrange(len(text) - 2)
            settings.update(stop=[text[at:at + 2]], include_stop_str_in_output=rng.random() < 0.5)
        if kind < 0.4 and rng.random() < 0.4:
            settings["min_tokens"] = rng.randrange(max_tokens + 1)
        if rng.random() < 0.1:
            settings["n"] = 2
        requests.append((prompt, SamplingParams(**settings)))
    return requests


def small_llm(checkpoint, num_blocks: int, **settings) -> LLM:
    """An engine whose cache holds ``num_blocks`` blocks of 8 tokens: a few sequences at a time."""
    return LLM(model=checkpoint, kv_cache_memory=num_blocks * BLOCK * PER_TOKEN, block_size=BLOCK,
               max_model_len=MAX_LEN, **settings)


def run_stepwise(llm: LLM, requests, rng: random.Random, tag: str, abort_chance: float = 0.0):
    """Add the requests a few at a time while the engine steps, aborting a random one now and then.
    → (finished outputs by request id, the outputs that abort returned by request id)."""
    engine = llm.engine
    queue = list(enumerate(requests))
    finished, aborted = {}, {}
    while queue or engine.has_unfinished_requests():
        while queue and rng.random() < 0.4:
            i, (prompt, params) = queue.pop(0)
            engine.add_request(f"{tag}{i}", prompt, params)
        if engine.requests and rng.random() < abort_chance:
            request_id = rng.choice(sorted(engine.requests))
            aborted[request_id] = engine.abort_request(request_id)
        finished |= {out.request_id: out for out in engine.step() if out.finished}
    return finished, aborted


def assert_matches(outputs: dict, aborted: dict, requests, reference: Reference, tokenizer, tag: str) -> None:
    for i, (prompt, params) in enumerate(requests):
        expected, reason = reference(prompt, params, tokenizer)
        if f"{tag}{i}" in aborted:  # whatever it got before the abort is the start of its answer
            for completion in aborted[f"{tag}{i}"].outputs:
                assert completion.token_ids == expected[: len(completion.token_ids)], (i, prompt, params)
            continue
        for completion in outputs[f"{tag}{i}"].outputs:
            assert (completion.token_ids, completion.finish_reason) == (expected, reason), (i, prompt, params)


def assert_every_block_free(llm: LLM) -> None:
    blocks = llm.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks
    assert all(block.ref_count == 0 for block in blocks.blocks)
    assert not llm.engine.has_unfinished_requests() and not llm.engine.scheduler.has_work


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_engine_equals_reference(checkpoint, reference, seed):
    rng = random.Random(seed)
    llm = small_llm(checkpoint, num_blocks=[10, 8][seed], max_num_batched_tokens=[16, 32][seed],
                    max_num_seqs=[256, 4][seed])
    tokenizer = llm.get_tokenizer()
    engine = llm.engine

    # all at once
    requests = random_requests(rng, 12, reference, tokenizer)
    got = llm.generate(prompt_token_ids=[p for p, _ in requests], sampling_params=[s for _, s in requests],
                       use_tqdm=False)
    assert_matches({str(i): out for i, out in enumerate(got)}, {}, requests, reference, tokenizer, "")
    assert_every_block_free(llm)
    # the same again, now mostly from the prefix cache: no cached block was left stale or overwritten
    hits = engine.blocks.prefix_hits
    again = llm.generate(prompt_token_ids=[p for p, _ in requests], sampling_params=[s for _, s in requests],
                         use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in again] == [[c.token_ids for c in o.outputs] for o in got]
    assert engine.blocks.prefix_hits > hits

    # added while others run, some aborted on the way
    requests = random_requests(rng, 12, reference, tokenizer)
    finished, aborted = run_stepwise(llm, requests, rng, "step", abort_chance=0.08)
    assert aborted and len(finished) + len(aborted) == len(requests)
    assert_matches(finished, aborted, requests, reference, tokenizer, "step")
    assert_every_block_free(llm)
    assert engine.scheduler.num_preemptions > 0 and engine.blocks.prefix_hits > 0  # the paths under test were taken


def test_fuzz_seeded_sampling_repeats_whatever_the_batch(checkpoint, reference):
    """A request with its own seed draws the same tokens alone or among others (README: `seed`; each seeded sequence
    has its own generator), through preemption and prefix-cache hits."""
    rng = random.Random(2)
    llm = small_llm(checkpoint, num_blocks=8, max_num_batched_tokens=16)
    tokenizer = llm.get_tokenizer()
    requests = random_requests(rng, 10, reference, tokenizer)
    seeded = [(prompt, SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=params.max_tokens,
                                      ignore_eos=True)) for i, (prompt, params) in enumerate(requests[:4])]
    alone = [llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0].outputs[0].token_ids
             for prompt, params in seeded]
    unseeded = [(prompt, SamplingParams(temperature=0.8, max_tokens=params.max_tokens, ignore_eos=True))
                for prompt, params in requests[4:]]
    mixed = seeded + unseeded
    rng.shuffle(mixed)
    finished, _ = run_stepwise(llm, mixed, rng, "mix")
    for i, (_, params) in enumerate(mixed):
        if params.seed is not None:
            assert finished[f"mix{i}"].outputs[0].token_ids == alone[params.seed - 100]
    assert llm.engine.scheduler.num_preemptions > 0
    assert_every_block_free(llm)
