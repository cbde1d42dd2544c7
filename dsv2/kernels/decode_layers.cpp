// A decoding step through the whole decoder stack for a few sequences (one token each), in one call: each layer's
// attention half (mla_decode) then its MoE half (moe_decode) or dense half (mlp_decode), each computing exactly what
// its own call computes, without the Python that runs between 2 calls per layer (module calls, the checks of which
// path applies, ~20 arguments converted per call): ~20% of a bf16 batch-1 step of the benchmark model.
//
//   weights  LAYER_SLOTS entries per layer, in the order of `Slot` (dsv2/model/transformer.py's DECODE_LAYER_SLOTS,
//            the same order): None where a layer has no such weight (q_proj or q_a_proj/q_a_norm/q_b_proj; a dense
//            layer has no gate and no routed experts, and its MLP takes the shared experts' slots)
//   cache    [layers, slots, r + d_R]: each layer's latent cache, read and written by the step's slots
//   final_norm  the model's last RMSNorm (eps final_eps), applied to the result when given
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common.h"

namespace {

using namespace dsv2_cpu;

enum Slot : int64_t {
  INPUT_NORM, Q_PROJ, Q_A_PROJ, Q_A_NORM, Q_B_PROJ, KV_A_PROJ, KV_A_NORM, W_UK_T, W_UV, O_PROJ,  // attention half
  POST_NORM, GATE, EXPERT_GATE, EXPERT_UP, EXPERT_DOWN, SHARED_GATE, SHARED_UP, SHARED_DOWN,  // MoE / MLP half
  LAYER_SLOTS
};

at::Tensor decode_layers(const at::Tensor& h_in, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache,
                         const at::Tensor& write_slots, const at::Tensor& read_slots, const at::Tensor& lengths,
                         const std::vector<std::optional<at::Tensor>>& weights, double eps, double scale,
                         int64_t top_k, bool group_limited, int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                         double routed_scaling_factor, const std::optional<at::Tensor>& final_norm, double final_eps) {
  const int64_t layers = cache.dim() == 3 ? cache.size(0) : -1;
  TORCH_CHECK(h_in.dim() == 2 && layers >= 1 && static_cast<int64_t>(weights.size()) == layers * LAYER_SLOTS,
              "decode_layers: h [B, H], cache [layers, slots, r + d_R] and ", LAYER_SLOTS,
              " weight slots per layer");
  at::Tensor h = h_in;
  for (int64_t layer = 0; layer < layers; ++layer) {
    const auto* w = &weights[layer * LAYER_SLOTS];
    auto required = [&](int64_t slot) -> const at::Tensor& {
      TORCH_CHECK(w[slot].has_value(), "decode_layers: layer ", layer, " lacks weight slot ", slot);
      return *w[slot];
    };
    h = mla_decode(h, w[Q_PROJ], w[Q_A_PROJ], w[Q_A_NORM], w[Q_B_PROJ], required(KV_A_PROJ), required(KV_A_NORM),
                   required(W_UK_T), required(W_UV), required(O_PROJ), cos, sin, cache[layer], write_slots, read_slots,
                   lengths, eps, scale, required(INPUT_NORM));
    if (w[GATE])
      h = moe_decode(h, *w[GATE], top_k, group_limited, n_group, topk_group, norm_topk_prob, routed_scaling_factor,
                     required(EXPERT_GATE), required(EXPERT_UP), required(EXPERT_DOWN), w[SHARED_GATE], w[SHARED_UP],
                     w[SHARED_DOWN], required(POST_NORM), eps);
    else
      h = mlp_decode(h, required(SHARED_GATE), required(SHARED_UP), required(SHARED_DOWN), required(POST_NORM), eps);
  }
  if (final_norm) {  // h is the last layer's fresh sum: normed in place
    h = h.contiguous();
    rms_norm_(h, *final_norm, final_eps);
  }
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsv2_cpu, m) {
  m.def(
      "decode_layers(Tensor h, Tensor cos, Tensor sin, Tensor(a!) cache, Tensor write_slots, Tensor read_slots, "
      "Tensor lengths, Tensor?[] weights, float eps, float scale, int top_k, bool group_limited, int n_group, "
      "int topk_group, bool norm_topk_prob, float routed_scaling_factor, Tensor? final_norm=None, "
      "float final_eps=1e-6) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv2_cpu, CPU, m) { m.impl("decode_layers", &decode_layers); }
