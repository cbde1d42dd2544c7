"""Which decoding steps `decode_layers` takes, and with which weights, checked once rather than at every step.

Deciding that a step can run through every layer in one kernel call (`DeepseekV2ForCausalLM.whole_step_applies`)
walks every layer's modules and weights, and gathering the ~18 weights of each layer walks them again: ~0.5 ms per
step for the benchmark's 8 layers, 6% of a bf16 decoding step there (batch 1). Both depend only on the model's
modules, their attributes, the weights' dtypes and a few facts of the step (its dtype, rows, cache, grad mode).
`DecodePlans` keeps the answer per such key and asks again when

* a module or parameter is registered anywhere in the process (torch's global registration hooks count them: a
  replaced projection, a tensor-parallel or LoRA wrapper, ``load_state_dict(assign=True)``),
* a parameter's dtype changed (``model.to(dtype)`` keeps the Parameter objects), or
* the step differs in a fact the checks read.

What it still does at every step: look for hooks on the layers (a hooked layer runs its own forward) and check that
no kv_b_proj weight changed (its storage or version), else take the absorbed W_UK / W_UV again (rebuilt by the
attention modules). Module attributes other than submodules and parameters (norm eps, the gate's routing settings,
sizes) are read when a plan is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from dsv2 import kernels
from dsv2.model.linear import Linear, small_matmul_applies, weight_key
from dsv2.model.moe import MoE
from dsv2.model.norm import RMSNorm

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
        self._layers: list[nn.Module] = []  # the decoder layers (a replaced one is a registration)
        self._kv_rank = 0
        self._plans: dict[tuple, DecodePlan | None] = {}

    def get(self, model: DeepseekV2ForCausalLM, h: torch.Tensor, cache: object) -> DecodePlan | None:
        """The plan for a decoding step of h [B, 1, H] over ``cache``, or None where `decode_layers` does not take
        it (`DeepseekV2ForCausalLM.whole_step_applies` is False)."""
        if self._registrations != _Registrations.count:  # what a registration can change, read again
            self._registrations, self._parameters, self._plans = _Registrations.count, list(model.parameters()), {}
            self._layers = list(model.model.layers)
            self._kv_rank = self._layers[0].self_attn.kv_rank
        if any(layer._forward_hooks or layer._forward_pre_hooks for layer in self._layers) or not hasattr(
                cache, "step_layers"):
            return None
        key = (tuple([p.dtype for p in self._parameters]), h.dtype, h.device, h.shape[0], model.attn_impl, type(cache),
               cache.fused_decode_applies(h.dtype, self._kv_rank), torch.is_grad_enabled(),
               torch.is_autocast_enabled("cpu"), kernels.cpu_ops() is not None)
        if key not in self._plans:
            self._plans[key] = self._make(model, h, cache)
        return self._plans[key]

    @staticmethod
    def _make(model: DeepseekV2ForCausalLM, h: torch.Tensor, cache: object) -> DecodePlan | None:
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
