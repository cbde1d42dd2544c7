"""Which decoding steps `decode_layers` takes, and with which weights, checked once rather than at every step.

Deciding that a step can run through every layer in one kernel call (`DeepseekV2ForCausalLM.whole_step_applies`)
walks every layer's modules and weights, and gathering the ~18 weights of each layer walks them again: ~0.5 ms per
step for the benchmark's 8 layers, 6% of a bf16 decoding step there (batch 1). Both depend only on the model's
modules, their attributes, the weights' dtypes and a few facts of the step (its dtype, rows, cache, grad mode).
`DecodePlans` keeps the answer per such key and asks again when

* a module or parameter is registered anywhere in the process (torch's global registration hooks count them: a
  replaced projection, a tensor-parallel or LoRA wrapper, ``load_state_dict(assign=True)``),
* the model is converted (``model.to(...)``: `DeepseekV2ForCausalLM._apply` drops the plans),
* the kernel refuses a weight of the plan: a part of the model converted on its own (``model.model.layers[3].to(
  torch.float32)`` keeps the Parameter objects and does not reach the model's ``_apply``) or a ``param.data``
  replaced. The kernel checks every weight's dtype, layout and size before the first layer writes the cache, so the
  step is then planned again and either runs layer by layer or, with the new plan, in one call again. (Walking the
  ~110 parameters' dtypes at every step instead cost ~80 µs of a step once the weights' stream had emptied the
  caches; it still runs for a step that goes layer by layer, so that a conversion back shows), or
* the step differs in a fact the checks read.

What it still does at every step: look for hooks on the layers and every module inside them, the embedding and the
rotary embedding (a hooked module runs its own forward; `dsv2.model.hooks`) and check that no kv_b_proj weight
changed (its storage or version), else take the absorbed W_UK / W_UV again (rebuilt by the attention modules).
Module attributes other than submodules and parameters (norm eps, the gate's routing settings, sizes) are read when
a plan is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from dsv2 import kernels
from dsv2.model.hooks import hook_tables
from dsv2.model.linear import Linear, small_matmul_applies, weight_key
from dsv2.model.moe import MoE
from dsv2.model.norm import RMSNorm
from dsv2.model.rope import RotaryEmbedding

if TYPE_CHECKING:
    from dsv2.model.attention import MultiHeadLatentAttention
    from dsv2.model.transformer import DeepseekV2ForCausalLM


# The weights `decode_layers` takes per layer, in its order (dsv2/kernels/decode_layers.cpp, enum Slot): None where a
# layer has no such weight; a dense layer's MLP takes the shared experts' slots.
DECODE_LAYER_SLOTS = ("input_norm", "q_proj", "q_a_proj", "q_a_norm", "q_b_proj", "kv_a_proj", "kv_a_norm", "w_uk_t",
                      "w_uv", "o_proj", "post_norm", "gate", "expert_gate", "expert_up", "expert_down", "shared_gate",
                      "shared_up", "shared_down")


class _Registrations:
    """How many modules and parameters have been registered in this process so far."""

    count = 0

    @classmethod
    def seen(cls, *_hook_args: object) -> None:
        cls.count += 1


torch_module.register_module_module_registration_hook(_Registrations.seen)
torch_module.register_module_parameter_registration_hook(_Registrations.seen)


@dataclass
class DecodePlan:
    """What `decode_layers` passes the kernel besides the step's tensors."""

    weights: list[torch.Tensor | None]  # every layer's DECODE_LAYER_SLOTS, one layer after another
    absorbed_slots: list[tuple[MultiHeadLatentAttention, int]]  # (attention, index of its W_UKᵀ in weights)
    routing: tuple[int, bool, int, int, bool, float]  # MoE.routing_args of every MoE layer
    eps: float
    softmax_scale: float
    final_norm: bool  # whether the call may apply the model's final norm (an RMSNorm in the step's dtype)
    head: bool  # whether it may apply the output head too (a plain Linear that small_matmul would take)
    kv_b_weights: list[torch.Tensor] = field(default_factory=list)  # each attention's kv_b_proj weight
    absorbed_from: list[tuple[int, int]] | None = None  # their `weight_key`s when W_UK / W_UV were last taken

    def refresh(self) -> list[torch.Tensor | None]:
        """The weights with each attention's current absorbed W_UKᵀ and W_UV (after its slot, W_UV), taken again
        only when a kv_b_proj weight changed: 8 calls of `absorbed_weights` cost ~30 µs a step, their keys ~4."""
        keys = [weight_key(w) for w in self.kv_b_weights]
        if keys != self.absorbed_from:
            for attention, slot in self.absorbed_slots:
                self.weights[slot], self.weights[slot + 1] = attention.absorbed_weights()
            self.absorbed_from = keys
        return self.weights


class DecodePlans:
    """One model's plans, by the facts of a step that the checks read."""

    def __init__(self) -> None:
        self._registrations = -1
        self._parameters: list[torch.nn.Parameter] = []
        self._embedding: torch.Tensor | None = None  # the embedding's weight: its dtype is the step's rows'
        self._layers: list[nn.Module] = []  # the decoder layers (a replaced one is a registration)
        self._hook_tables: list[dict] = []  # the hooks of the modules the call would pass by (`hook_tables`)
        self._kv_rank = 0
        # by the step's facts: the plan, and for None (layer by layer) the parameters' dtypes then
        self._plans: dict[tuple, tuple[DecodePlan | None, tuple[torch.dtype, ...] | None]] = {}

    def get(self, model: DeepseekV2ForCausalLM, input_ids: torch.Tensor, cache: object,
            recheck: bool = False) -> DecodePlan | None:
        """The plan for a decoding step of input_ids [B, 1] over ``cache``, or None where `decode_layers` does not
        take it (`DeepseekV2ForCausalLM.whole_step_applies` is False). ``recheck``: make it again, whatever is kept
        (after the call refused a weight of the plan: see the module's docstring)."""
        if recheck or self._registrations != _Registrations.count:  # what a registration can change, read again
            self._registrations, self._plans = _Registrations.count, {}
            self._parameters = list(model.parameters())
            self._layers = list(model.model.layers)
            inside = [module for layer in self._layers for module in layer.modules()]
            self._hook_tables = hook_tables([*inside, model.model.embed_tokens, model.model.rotary])
            self._embedding = getattr(model.model.embed_tokens, "weight", None)  # None: a wrapper: layer by layer
            self._kv_rank = self._layers[0].self_attn.kv_rank
        if self._embedding is None or not hasattr(cache, "step_tables") or any(self._hook_tables):
            return None
        dtype = self._embedding.dtype  # the step's rows'
        key = (dtype, input_ids.device, input_ids.shape[0], model.attn_impl, type(cache),
               cache.fused_decode_applies(dtype, self._kv_rank), torch.is_grad_enabled(),
               torch.is_autocast_enabled("cpu"), kernels.cpu_ops() is not None)
        kept = self._plans.get(key)
        if kept is None or (kept[0] is None and kept[1] != self._dtypes()):
            plan = self._make(model, input_ids, cache)
            self._plans[key] = kept = plan, None if plan is not None else self._dtypes()
        return kept[0]

    def _dtypes(self) -> tuple[torch.dtype, ...]:
        """Every parameter's dtype: what a kept None must still match (no call runs to find a conversion since)."""
        return tuple([p.dtype for p in self._parameters])

    @staticmethod
    def _make(model: DeepseekV2ForCausalLM, input_ids: torch.Tensor, cache: object) -> DecodePlan | None:
        embed, rotary = model.model.embed_tokens, model.model.rotary
        if type(embed) is not nn.Embedding or embed.max_norm is not None or type(rotary) is not RotaryEmbedding:
            return None  # the call takes the embedding's rows and the rotary tables itself
        h = torch.empty(input_ids.shape[0], 1, embed.embedding_dim, dtype=embed.weight.dtype,
                        device=input_ids.device)  # the step's rows, as the embedding gives them
        if not model.whole_step_applies(h, cache):
            return None
        layers = model.model.layers
        weights = [weight for layer in layers for weight in layer.decode_weights()]
        w_uk_t = DECODE_LAYER_SLOTS.index("w_uk_t")
        absorbed = [(layer.self_attn, i * len(DECODE_LAYER_SLOTS) + w_uk_t) for i, layer in enumerate(layers)]
        routing = next((layer.mlp.routing_args() for layer in layers if isinstance(layer.mlp, MoE)),
                       (1, False, 1, 1, False, 1.0))  # no MoE layer: unused
        attention, norm, head = layers[0].self_attn, model.model.norm, model.lm_head
        final_norm = type(norm) is RMSNorm and norm.weight.dtype == h.dtype
        plain_head = final_norm and type(head) is Linear and head.bias is None and small_matmul_applies(
            h.shape[0], h, head.weight)
        return DecodePlan(weights, absorbed, routing, attention.kv_a_layernorm.eps, attention.softmax_scale,
                          final_norm, plain_head, [layer.self_attn.kv_b_proj.weight for layer in layers])
