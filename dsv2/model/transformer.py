"""The DeepSeek-V2 decoder stack and the causal-LM head. Module names equal the official checkpoint keys."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsv2 import kernels
from dsv2.config import ModelConfig, parse_dtype
from dsv2.generation_config import GenerationConfig
from dsv2.malloc import place_on_huge_pages
from dsv2.model.attention import AttentionImpl, MultiHeadLatentAttention
from dsv2.model.cache import LatentCache
from dsv2.model.decode_plan import DECODE_LAYER_SLOTS, DecodePlan, DecodePlans
from dsv2.model.hooks import hooked, hooked_within
from dsv2.model.linear import Linear
from dsv2.model.loss import linear_cross_entropy
from dsv2.model.moe import MLP, MoE, MoEStats, mlp_kernel_applies
from dsv2.model.norm import RMSNorm
from dsv2.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: LatentCache | None, attn_impl: AttentionImpl,
                with_stats: bool = True) -> tuple[torch.Tensor, MoEStats | None]:
        """h [B, T, H] → h [B, T, H], and MoE statistics (None for a dense layer, or unless ``with_stats``).

        Decoding a few sequences on an AVX-512 CPU, each half of the layer (norm, block, residual sum) is one kernel
        call where it applies (`MultiHeadLatentAttention.fused_step`, `MoE.decode_step`); where every layer's halves
        are, the model runs all of them in one call instead (`DeepseekV2ForCausalLM.decode_layers`)."""
        if self.attention_kernel_applies(h, cache, attn_impl):
            h = self.self_attn.fused_step(h, cos, sin, positions, cache, self.input_layernorm)
        else:
            h = h + self.self_attn(self.input_layernorm(h), cos, sin, positions, cache, attn_impl)
        if isinstance(self.mlp, MoE) and not with_stats and self.moe_kernel_applies(h):
            return self.mlp.decode_step(h, self.post_attention_layernorm), None
        if isinstance(self.mlp, MoE):
            y, stats = self.mlp(self.post_attention_layernorm(h), with_stats)
            return h + y, stats
        return h + self.mlp(self.post_attention_layernorm(h)), None

    def attention_kernel_applies(self, h: torch.Tensor, cache: LatentCache | None, attn_impl: AttentionImpl) -> bool:
        """Whether the attention half of this step (norm, attention, residual sum) is one `mla_decode` call: one
        token per row, a cache, the absorbed path allowed, no hook on the norm or the attention module, and what
        `fused_step_applies` asks."""
        attention, norm = self.self_attn, self.input_layernorm
        return (h.shape[1] == 1 and cache is not None and attn_impl != "expanded" and norm.weight.dtype == h.dtype
                and norm.eps == attention.kv_a_layernorm.eps and not hooked(norm) and not hooked(attention)
                and attention.fused_step_applies(h, cache))

    def moe_kernel_applies(self, h: torch.Tensor) -> bool:
        """Whether the MoE half of this step (norm, MoE, residual sum) is one `moe_decode` call (no statistics, no
        hook on the norm or the MoE module, and what `MoE.decode_kernel_applies` asks)."""
        norm = self.post_attention_layernorm
        return (isinstance(self.mlp, MoE) and norm.weight.dtype == h.dtype and not hooked(norm)
                and not hooked(self.mlp) and self.mlp.decode_kernel_applies(h))

    def whole_step_applies(self, h: torch.Tensor, cache: LatentCache | None, attn_impl: AttentionImpl) -> bool:
        """Whether `decode_layers` can take this layer (no statistics): both halves as kernels (a dense MLP too,
        `mlp_kernel_applies`), with one eps for all of the layer's norms."""
        post, eps = self.post_attention_layernorm, self.self_attn.kv_a_layernorm.eps
        if not self.attention_kernel_applies(h, cache, attn_impl) or post.eps != eps:
            return False
        if isinstance(self.mlp, MoE):
            return self.moe_kernel_applies(h)
        return (type(self.mlp) is MLP and post.weight.dtype == h.dtype and not hooked(post)
                and not hooked_within(self.mlp) and mlp_kernel_applies(self.mlp, h))

    def decode_weights(self) -> list[torch.Tensor | None]:
        """This layer's weights for `decode_layers`, in DECODE_LAYER_SLOTS order."""
        attention, mlp = self.self_attn, self.mlp
        lora = attention.q_lora_rank is not None
        w_uk_t, w_uv = attention.absorbed_weights()
        moe = mlp if isinstance(mlp, MoE) else None
        shared = mlp if moe is None else moe.shared_experts
        weights = [
            self.input_layernorm.weight,
            None if lora else attention.q_proj.weight,
            attention.q_a_proj.weight if lora else None,
            attention.q_a_layernorm.weight if lora else None,
            attention.q_b_proj.weight if lora else None,
            attention.kv_a_proj_with_mqa.weight, attention.kv_a_layernorm.weight, w_uk_t, w_uv, attention.o_proj.weight,
            self.post_attention_layernorm.weight,
            *((None,) * 4 if moe is None else (moe.gate.weight, moe.experts.gate_proj, moe.experts.up_proj,
                                               moe.experts.down_proj)),
            *((None,) * 3 if shared is None else (shared.gate_proj.weight, shared.up_proj.weight,
                                                  shared.down_proj.weight)),
        ]
        assert len(weights) == len(DECODE_LAYER_SLOTS)
        return weights


class DeepseekV2Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # [B, T, vocab] float32; None when the loss was asked for (``targets``)
    aux_loss: torch.Tensor  # scalar: the summed expert-level balance losses (0 outside training)
    expert_load: torch.Tensor  # [num_moe_layers, n_routed_experts] float32: tokens routed to each expert
    loss: torch.Tensor | None = None  # scalar: Σ target_weights · cross-entropy (with ``targets``)
    token_loss: torch.Tensor | None = None  # [B, T] float32 cross-entropy of each target, detached


# keywords of transformers' from_pretrained that mean nothing for a local checkpoint folder loaded here
TRANSFORMERS_ONLY_ARGUMENTS = frozenset({
    "trust_remote_code", "low_cpu_mem_usage", "attn_implementation", "revision", "cache_dir", "local_files_only",
    "use_safetensors", "token", "use_auth_token", "force_download", "resume_download", "proxies", "subfolder",
    "variant", "code_revision", "_fast_init", "offload_folder", "offload_state_dict", "max_memory",
})
AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def device_from_map(device_map: str | int | torch.device | dict[str, Any]) -> torch.device:
    """transformers' ``device_map`` → the one device it names ("auto": CUDA where available, else the CPU)."""
    if isinstance(device_map, dict):
        devices = {str(d) for d in device_map.values()}
        if len(devices) != 1:
            raise NotImplementedError(
                f"device_map places layers on several devices ({', '.join(sorted(devices)) or 'none'}), which "
                "from_pretrained does not do: load on one device, or use tensor/expert parallelism through "
                "dsv2.engine")
        device_map = next(iter(device_map.values()))
    if isinstance(device_map, str) and device_map in AUTO_DEVICE_MAPS:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return torch.device("cuda", device_map)
    if isinstance(device_map, str | torch.device):
        try:
            return torch.device(device_map)
        except RuntimeError as e:
            raise ValueError(f"device_map={device_map!r} names no device: expected 'auto', 'cpu', 'cuda', "
                             "'cuda:N', an index or a torch.device") from e
    raise TypeError(f"device_map must be a device name, index, torch.device or dict; got "
                    f"{type(device_map).__name__}")


class DeepseekV2ForCausalLM(nn.Module):
    """DeepSeek-V2 / V2-Lite. ``model(input_ids)`` → float32 logits; see ``forward`` for caches and training."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DeepseekV2Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.attn_impl: AttentionImpl = "auto"
        self.use_cuda_graphs = True  # `generate` / `stream` on a GPU replay recorded decoding steps (model.cuda_graph)
        self._decode_plans = DecodePlans()
        self.tokenizer = None  # set by from_pretrained when the folder has a tokenizer.json
        self.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, bos_token_id=config.bos_token_id)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def tie_weights(self) -> None:
        """Share the input embedding with the output head when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, std: float | None = None, seed: int | None = None) -> None:
        """Normal(0, std) for every matrix (default config.initializer_range), ones for the norms, zeros for biases.

        Without ``seed`` the matrices draw from torch's global generator, one after another. With it, each draws
        from its own generator, seeded by (seed, the parameter's name), and each routed expert of a stacked
        [E, …] tensor by (seed, name, the expert's index): the values do not depend on the device, on the order of
        the parameters, or on which experts this model holds (an expert-parallel rank's slice, whose module says
        where it starts with ``first_expert``, gets exactly the whole model's values of those experts)."""
        std = self.config.initializer_range if std is None else std
        done: set[int] = set()  # a tied weight is one parameter under two names: the first name counts
        for module_name, module in self.named_modules():
            for short_name, param in module.named_parameters(recurse=False):
                if id(param) in done:
                    continue
                done.add(id(param))
                name = f"{module_name}.{short_name}" if module_name else short_name
                if name.endswith("norm.weight"):
                    nn.init.ones_(param)
                elif name.endswith(".bias"):
                    nn.init.zeros_(param)
                elif seed is None:
                    nn.init.normal_(param, mean=0.0, std=std)
                else:
                    _seeded_normal_(param, std, seed, name, getattr(module, "first_expert", None))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: LatentCache | None = None, logits_at: torch.Tensor | None = None,
                return_aux: bool | None = None, targets: torch.Tensor | None = None,
                target_weights: torch.Tensor | None = None) -> torch.Tensor | CausalLMOutput:
        """input_ids [B, T] → logits [B, T, vocab] (float32).

        positions [B, T] or [T]: defaults to cache.seq_len + arange(T). With a ``cache``, the tokens' latents are
        written to it at their positions and attention covers every cached entry at a position ≤ the query's.
        ``logits_at`` [B, K]: compute logits only for these token indices (→ [B, K, vocab]), e.g. a prompt's last.
        ``return_aux`` (default: ``self.training``) returns a CausalLMOutput with the balance loss and expert load.
        ``targets`` [B, T] (the next token of each position; -100: none) returns a CausalLMOutput with the loss
        Σ target_weights · cross-entropy (``target_weights`` [B, T], default: the mean over targets) and no logits:
        they are computed a chunk of tokens at a time (dsv2.model.loss), never all at once.
        """
        B, T = input_ids.shape
        with_aux = targets is not None or (self.training if return_aux is None else return_aux)
        if positions is None:
            start = 0 if cache is None else cache.seq_len
            positions = torch.arange(start, start + T, device=input_ids.device)
        if isinstance(cache, LatentCache):
            cache.check_batch(B)
        moe_stats = []
        decoding = T == 1 and cache is not None and not with_aux
        one_call = self._decode_step(input_ids, positions, cache, logits_at) if decoding else None
        normed = False
        if one_call is not None:
            h, applied = one_call
            cache.advance(T)
            if applied == "logits":
                return h
            normed = applied == "norm"
        else:
            positions = positions.expand(B, T)  # [B, T]
            cos, sin = self.model.rotary(positions)  # [B, T, d_R/2] each
            h = self.model.embed_tokens(input_ids)  # [B, T, H]
            for layer in self.model.layers:
                h, stats = layer(h, cos, sin, positions, cache, self.attn_impl, with_aux)
                if stats is not None:
                    moe_stats.append(stats)
            if cache is not None:
                cache.advance(T)
        if logits_at is not None:
            h = h.gather(1, logits_at[:, :, None].expand(-1, -1, h.shape[-1]))  # [B, K, H]
        if not normed:
            h = self.model.norm(h)  # [B, T or K, H]
        loss = token_loss = logits = None
        if targets is not None:
            loss, token_loss = linear_cross_entropy(
                h.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                None if target_weights is None else target_weights.flatten())
            token_loss = token_loss.view(targets.shape)
        else:
            logits = self.lm_head(h).float()  # [B, T or K, vocab]
            if not with_aux:
                return logits
        if moe_stats:
            aux_loss = torch.stack([s.balance_loss for s in moe_stats]).sum()
            expert_load = torch.stack([s.expert_load for s in moe_stats])  # [num_moe_layers, E]
        else:
            aux_loss, expert_load = torch.zeros((), device=h.device), torch.zeros(0, 0, device=h.device)
        return CausalLMOutput(logits, aux_loss, expert_load, loss, token_loss)

    # ----------------------------------------------------------------------------------------------- checkpoints
    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> DeepseekV2ForCausalLM:
        """A randomly initialized model (``init_weights``), built directly in the target dtype and device."""
        model = cls.empty(config, dtype, device)
        model.init_weights()
        return model

    @classmethod
    def empty(cls, config: ModelConfig, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> DeepseekV2ForCausalLM:
        """A model with uninitialized parameters in ``dtype`` on ``device``, to be filled by a loader. On CPU they
        share one region on huge pages (`dsv2.malloc.place_on_huge_pages`), which decoding streams faster."""
        with torch.device("meta"):
            model = cls(config)
        model.to(dtype or torch.float32)  # free on the meta device
        model.to_empty(device=device or "cpu")  # allocated, never touched: no memory used until written
        model.tie_weights()  # to_empty replaces parameters one module at a time, which unties them
        if model.device.type == "cpu":
            place_on_huge_pages(model, keep_values=False)
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, progress: bool | None = None,
                        allow_pickle: bool = False, torch_dtype: torch.dtype | str | None = None,
                        device_map: str | int | torch.device | dict[str, Any] | None = None,
                        **ignored: Any) -> DeepseekV2ForCausalLM:
        """Load an official checkpoint folder (config.json + safetensors, single file or shards with an index).

        Tensors are read one at a time from memory-mapped files straight into the target ``dtype`` (default: the
        checkpoint's ``torch_dtype``; ``torch_dtype`` is accepted as transformers' name for it, and the two
        must agree when both are given) and ``device``.
        Pickled ``.bin`` weights are read only with ``allow_pickle``. The folder's tokenizer.json and
        generation_config.json, when present, become ``model.tokenizer`` and ``model.generation_config``.
        ``device_map`` (transformers' name) may name one device: "cpu", "cuda", "cuda:1", an index, a torch.device,
        a dict placing everything on one device, or "auto" (CUDA where available, else the CPU); layers spread over
        devices are refused (tensor or expert parallelism runs through `dsv2.engine`). transformers-only arguments
        that mean nothing here (``TRANSFORMERS_ONLY_ARGUMENTS``: trust_remote_code, low_cpu_mem_usage,
        attn_implementation, revision, ...) are accepted and ignored; any other keyword is ignored with a warning.
        """
        from dsv2.weights import load_weights

        unknown = sorted(set(ignored) - TRANSFORMERS_ONLY_ARGUMENTS)
        if unknown:
            warnings.warn(f"from_pretrained ignores unknown keyword argument{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(unknown)}", stacklevel=2)
        if device_map is not None:
            mapped = device_from_map(device_map)
            if device is not None and torch.device(device) != mapped:
                raise ValueError(f"from_pretrained got device={device!r} and device_map={device_map!r}, which "
                                 "disagree: pass one")
            device = mapped
        config = ModelConfig.from_pretrained(path)
        model = cls.empty(config, _requested_dtype(dtype, torch_dtype) or config.dtype, device)
        load_weights(model, path, progress=progress, allow_pickle=allow_pickle)
        if (Path(path) / "tokenizer.json").exists():
            from dsv2.tokenizer import Tokenizer

            model.tokenizer = Tokenizer.from_pretrained(path)
        if (Path(path) / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(path)
        return model.eval()

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB",
                        dtype: torch.dtype | None = None, safe_serialization: bool = True) -> None:
        """Write config.json, generation_config.json + safetensors (sharded with an index beyond
        ``max_shard_size``), official key names. safetensors is the only format written: ``safe_serialization``
        (transformers' switch) must stay True."""
        from dsv2.weights import save_weights

        if not safe_serialization:
            raise ValueError("save_pretrained writes safetensors only: safe_serialization=False (pickled "
                             "pytorch_model.bin) is not supported")

        save_weights(self, path, max_shard_size=max_shard_size, dtype=dtype)

    # ------------------------------------------------------------------------------------------------ generation
    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """transformers-style: input_ids [B, T] → [B, T + new]; greedy unless do_sample / temperature > 0.
        See dsv2.generate.generate for the arguments."""
        from dsv2.generate import generate

        kwargs.setdefault("tokenizer", self.tokenizer)
        return generate(self, input_ids, **kwargs)

    def stream(self, prompt: str | list[int], **kwargs) -> Iterator[str]:
        """Yield the completion of ``prompt`` (text or token ids) as text deltas. See dsv2.generate.stream."""
        from dsv2.generate import stream

        tokenizer = kwargs.pop("tokenizer", None) or self.tokenizer
        if tokenizer is None:
            raise ValueError("stream() needs a tokenizer: load the model from a folder with tokenizer.json, or pass "
                             "tokenizer=Tokenizer.from_pretrained(path)")
        return stream(self, tokenizer, prompt, **kwargs)

    def whole_step_applies(self, h: torch.Tensor, cache: LatentCache) -> bool:
        """Whether `decode_layers` takes this decoding step (h [B, 1, H], the embedding's rows): every layer's
        `whole_step_applies`, one routing for all MoE layers, a cache that hands out every layer's slots at once, and
        no hooks on the layers (or inside them), the embedding or the rotary embedding (the one call would pass them
        by)."""
        layers = self.model.layers
        passed_by = any(map(hooked_within, (*layers, self.model.embed_tokens, self.model.rotary)))
        return (not passed_by and hasattr(cache, "step_tables")
                and all(layer.whole_step_applies(h, cache, self.attn_impl) for layer in layers)
                and len({layer.mlp.routing_args() for layer in layers if isinstance(layer.mlp, MoE)}) <= 1)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DeepseekV2ForCausalLM:
        self._decode_plans = DecodePlans()  # a conversion may replace the parameters without registering them
        return super()._apply(fn, recurse)

    def decode_plan(self, input_ids: torch.Tensor, cache: LatentCache) -> DecodePlan | None:
        """`whole_step_applies` and the weights `decode_layers` takes, kept for the next steps of this kind
        (`dsv2.model.decode_plan`): None where the step of input_ids [B, 1] goes layer by layer."""
        return self._decode_plans.get(self, input_ids, cache)

    def _decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache,
                     logits_at: torch.Tensor | None) -> tuple[torch.Tensor, str] | None:
        """`decode_layers` with the step's plan, or None where the step goes layer by layer."""
        # one token per row: the logits wanted are the step's own (logits_at, the engine's, selects token 0)
        only_token = logits_at is None or (logits_at.shape[1] == 1 and bool((logits_at == 0).all()))
        return self._planned_call(input_ids, cache, lambda plan: self.decode_layers(input_ids, positions, cache, plan,
                                                                                    logits=only_token))

    def _planned_call(self, input_ids: torch.Tensor, cache: LatentCache, call: Callable[[DecodePlan], Any],
                      usable: Callable[[DecodePlan], bool] = lambda plan: True) -> Any:
        """call(the step's plan), or None where there is no plan (the step goes layer by layer) or it is not
        ``usable``. Where the call refuses a weight of a kept plan (a part of the model converted since), the step is
        planned again (`dsv2.model.decode_plan`); what the call refuses then is the caller's error."""
        plan = self.decode_plan(input_ids, cache)
        if plan is None or not usable(plan):
            return None
        try:
            return call(plan)
        except RuntimeError:  # raised before any layer wrote the cache
            plan = self._decode_plans.get(self, input_ids, cache, recheck=True)
            if plan is None or not usable(plan):
                return None
            return call(plan)

    def _kernel_step_args(self, input_ids: torch.Tensor, positions: torch.Tensor,
                          tables: tuple[torch.Tensor, torch.Tensor], plan: DecodePlan) -> list:
        """The arguments `decode_layers` and `decode_greedy` share: the step's tensors, the cache's ``tables``
        (its `step_tables`), the rotary tables and the plan's weights and settings."""
        cache_layers, read_slots = tables
        cos, sin = self.model.rotary.tables(read_slots.shape[1], input_ids.device)  # [P, d_R/2] each
        if positions.numel() != input_ids.shape[0]:  # [1] or [1, 1]: one position for every row
            positions = positions.expand(input_ids.shape[0], 1)
        return [input_ids, self.model.embed_tokens.weight, positions, cos, sin, cache_layers, read_slots,
                plan.refresh(), plan.eps, plan.softmax_scale, *plan.routing]

    def decode_layers(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache, plan: DecodePlan,
                      logits: bool = False) -> tuple[torch.Tensor, str]:
        """A decoding step of input_ids [B, 1] at positions [B, 1] (or [1]) through every layer in one kernel call
        (`decode_layers`), what the layers' own kernel calls compute, with the step's `decode_plan`. The call takes
        the embedding's rows itself and RoPE's values from the rotary tables (`RotaryEmbedding.tables`), so a step
        runs no torch operation before it (each ~30 µs once the weights' stream has emptied the caches). Returns
        (h [B, 1, H], "layers"); or, where the plan allows and no hook on the final norm must run, the normed h,
        "norm"; or, asked for ``logits`` and where no hook on the head must run either, the logits [B, 1, V] in
        float32, "logits" (the head's product in the same call)."""
        norm, head = self.model.norm, self.lm_head
        fold_norm = plan.final_norm and not hooked(norm)
        fold_head = fold_norm and logits and plan.head and not hooked(head)
        out = kernels.cpu_ops().decode_layers(*self._kernel_step_args(input_ids, positions, cache.step_tables(), plan),
                                              norm.weight if fold_norm else None, norm.eps,
                                              head.weight if fold_head else None)  # [B, 1, H or V]
        return out, "logits" if fold_head else "norm" if fold_norm else "layers"

    @torch.no_grad()
    def decode_greedy(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache, steps: int,
                      stop_ids: Collection[int] = (), finished_rows: Collection[int] = ()) -> torch.Tensor | None:
        """Up to ``steps`` greedy decoding steps of input_ids [B, 1] at positions [B, 1] (or [1]) in one kernel call
        (`decode_greedy`): each step's token is its logits' first maximum (the tokens that `forward` and
        `greedy_tokens` give step by step, bit for bit), and the next step's input at the next position. Ends early
        after a step where every row has drawn one of ``stop_ids`` or is among ``finished_rows``. → the tokens drawn
        [B, n], n ≤ steps, the cache advanced by n; None where the steps cannot be one call: the step goes layer by
        layer or the call could not apply the final norm and the head (`decode_plan`), or a hook on the model, its
        final norm or its head must see each step."""
        norm, head = self.model.norm, self.lm_head
        if hooked(self) or hooked(norm) or hooked(head):
            return None

        def call(plan: DecodePlan) -> torch.Tensor:
            return kernels.cpu_ops().decode_greedy(
                *self._kernel_step_args(input_ids, positions, cache.step_tables(steps), plan), norm.weight, norm.eps,
                head.weight, steps, sorted(stop_ids), sorted(finished_rows))  # [B, n]

        tokens = self._planned_call(input_ids, cache, call, usable=lambda plan: plan.final_norm and plan.head)
        if tokens is not None:
            cache.advance(tokens.shape[1])
        return tokens

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _requested_dtype(dtype: torch.dtype | str | None, torch_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """from_pretrained's ``dtype`` or its transformers spelling ``torch_dtype`` (None / "auto": the checkpoint's);
    given both, they must agree."""
    parsed, parsed_torch = parse_dtype(dtype), parse_dtype(torch_dtype)
    if parsed is not None and parsed_torch is not None and parsed != parsed_torch:
        raise ValueError(f"from_pretrained got dtype={dtype!r} and torch_dtype={torch_dtype!r}, which disagree: "
                         "pass one")
    return parsed or parsed_torch


def _seeded_normal_(param: torch.Tensor, std: float, seed: int, name: str, first_expert: int | None) -> None:
    """Fill ``param`` with Normal(0, std) values drawn on the CPU in float32 from a generator seeded by (seed, name),
    or, for a stack of routed experts whose first is expert ``first_expert``, each expert's [I, H] slice from one
    seeded by (seed, name, its index). A DTensor (a parameter FSDP sharded before it was allocated) takes its own
    part of the whole parameter's values."""

    def draw(shape: torch.Size, key: str) -> torch.Tensor:
        digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.empty(shape).normal_(0.0, std, generator=generator)

    if first_expert is None:
        copy_whole_(param, draw(param.shape, name))
    elif _rows_sharded(param):  # FSDP's shard of a stack of experts: a run of whole experts, drawn alone
        local = param.to_local()  # [experts here, I, H]: torch.chunk's split of dim 0, as FSDP shards it
        first = param.device_mesh.get_local_rank() * -(-param.shape[0] // param.device_mesh.size())
        with torch.no_grad():
            for i in range(local.shape[0]):
                local[i].copy_(draw(local.shape[1:], f"{name}[{first_expert + first + i}]"))
    else:
        copy_whole_(param, torch.stack([draw(param.shape[1:], f"{name}[{first_expert + i}]")
                                        for i in range(param.shape[0])]))


def _rows_sharded(param: torch.Tensor) -> bool:
    """Whether param is a DTensor split along dim 0 over a 1-d mesh (FSDP's sharding), nothing else."""
    placements = getattr(param, "placements", None)
    return placements is not None and len(placements) == 1 and placements[0].is_shard(0)


def copy_whole_(target: torch.Tensor, values: torch.Tensor) -> None:
    """target.copy_(values) for values of the whole tensor, where target may be a DTensor (a parameter that FSDP
    sharded): it takes its own part of them."""
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        values = distribute_tensor(values.to(target.device), target.device_mesh, target.placements,
                                   src_data_rank=None)
    with torch.no_grad():
        target.copy_(values)
