// A decoding step through the whole decoder stack for a few sequences (one token each), in one call: each layer's
// attention half (mla_decode) then its MoE half (moe_decode) or dense half (mlp_decode), each computing exactly what
// its own call computes, without the Python that runs between 2 calls per layer (module calls, the checks of which
// path applies, ~20 arguments converted per call): ~20% of a bf16 batch-1 step of the benchmark model. The layers
// run on raw pointers (`mla_out`, `moe_out`, `mlp_out`) with the residual stream updated in place: no torch operation
// per layer (~80 of ~1 µs each before, on the calling thread while the other waited: a bf16 batch-1 step 1.09×,
// float32 1.05×, same-process A/B on the benchmark model).
//
//   h        [B, H] or the model's [B, 1, H] (then cos and sin [B, 1, d_R/2], and the result [B, 1, ·])
//   weights  LAYER_SLOTS entries per layer, in the order of `Slot` (dsv2/model/transformer.py's DECODE_LAYER_SLOTS,
//            the same order): None where a layer has no such weight (q_proj or q_a_proj/q_a_norm/q_b_proj; a dense
//            layer has no gate and no routed experts, and its MLP takes the shared experts' slots)
//   cache    [layers, slots, r + d_R]: each layer's latent cache, read and written by the step's slots
//   final_norm  the model's last RMSNorm (eps final_eps), applied to the result when given
//   head     the output head's weight [V, H]: with final_norm, the call returns the logits [B, V] in float32 (rounded
//            to h's dtype first, as the head's own product rounds them) instead of h
#include <torch/library.h>

#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

using namespace dsv2_cpu;

enum Slot : int64_t {
  INPUT_NORM, Q_PROJ, Q_A_PROJ, Q_A_NORM, Q_B_PROJ, KV_A_PROJ, KV_A_NORM, W_UK_T, W_UV, O_PROJ,  // attention half
  POST_NORM, GATE, EXPERT_GATE, EXPERT_UP, EXPERT_DOWN, SHARED_GATE, SHARED_UP, SHARED_DOWN,  // MoE / MLP half
  LAYER_SLOTS
};

at::Tensor decode_layers(const at::Tensor& h_3d, const at::Tensor& cos_3d, const at::Tensor& sin_3d,
                         const at::Tensor& cache, const at::Tensor& write_slots, const at::Tensor& read_slots,
                         const at::Tensor& lengths,
                         const std::vector<std::optional<at::Tensor>>& weights, double eps, double scale,
                         int64_t top_k, bool group_limited, int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                         double routed_scaling_factor, const std::optional<at::Tensor>& final_norm, double final_eps,
                         const std::optional<at::Tensor>& head) {
  TORCH_CHECK(!head || final_norm, "decode_layers: the output head takes the final norm's result (final_norm)");
  // the model's [B, 1, ·] step tensors as they come (one token per row), viewed here rather than sliced in Python
  const bool steps = h_3d.dim() == 3;
  TORCH_CHECK(!steps || (h_3d.size(1) == 1 && cos_3d.dim() == 3 && sin_3d.dim() == 3),
              "decode_layers: h [B, H] or [B, 1, H] with cos and sin [B, d_R/2] or [B, 1, d_R/2]");
  const auto h_in = steps ? h_3d.squeeze(1) : h_3d;
  const auto cos = steps ? cos_3d.squeeze(1) : cos_3d, sin = steps ? sin_3d.squeeze(1) : sin_3d;
  const int64_t layers = cache.dim() == 3 ? cache.size(0) : -1;
  TORCH_CHECK(h_in.dim() == 2 && layers >= 1 && static_cast<int64_t>(weights.size()) == layers * LAYER_SLOTS,
              "decode_layers: h [B, H], cache [layers, slots, r + d_R] and ", LAYER_SLOTS,
              " weight slots per layer");
  const auto dtype = h_in.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "decode_layers: bfloat16 or float32");
  const int64_t B = h_in.size(0), H = h_in.size(1);
  const StepRows step("decode_layers", B, cos, sin, write_slots, read_slots, lengths, eps, scale);
  const DecodeRows& rows = step.rows;
  const Routing routing{top_k, group_limited, n_group, topk_group, norm_topk_prob, routed_scaling_factor};
  std::vector<std::optional<at::Tensor>> held(weights.size());  // contiguous weights (the same tensors, mostly)
  for (size_t i = 0; i < weights.size(); ++i)
    if (weights[i]) held[i] = weights[i]->contiguous();
  auto h = h_in.contiguous().clone();  // the residual stream, updated in place layer after layer
  auto run = [&](auto zero) {
    using T = decltype(zero);
    // every layer's weights checked before the first one runs (an error leaves the cache as it was)
    struct Layer {
      const T *input_norm, *post_norm;
      MlaLayer<T> attention;
      bool moe;
      MoeLayer<T> experts;  // moe
      MlpLayer<T> mlp;  // otherwise
    };
    std::vector<Layer> stack(layers);
    for (int64_t layer = 0; layer < layers; ++layer) {
      const auto* w = &held[layer * LAYER_SLOTS];
      auto required = [&](int64_t slot) -> const at::Tensor& {
        TORCH_CHECK(w[slot].has_value(), "decode_layers: layer ", layer, " lacks weight slot ", slot);
        return *w[slot];
      };
      Layer& L = stack[layer];
      L.attention = mla_layer<T>(w[Q_PROJ], w[Q_A_PROJ], w[Q_A_NORM], w[Q_B_PROJ], required(KV_A_PROJ),
                                 required(KV_A_NORM), required(W_UK_T), required(W_UV), required(O_PROJ), cache[layer]);
      TORCH_CHECK(L.attention.hidden == H && cos.size(1) * 2 == L.attention.rope_dim,
                  "decode_layers: sizes disagree (h [B, H] and cos [B, d_R/2] against the weights)");
      L.input_norm = weight_data<T>(required(INPUT_NORM), H, "decode_layers: input_layernorm");
      L.post_norm = weight_data<T>(required(POST_NORM), H, "decode_layers: post_attention_layernorm");
      L.moe = w[GATE].has_value();
      if (L.moe) {
        L.experts = moe_layer<T>(*w[GATE], routing, required(EXPERT_GATE), required(EXPERT_UP), required(EXPERT_DOWN),
                                 w[SHARED_GATE], w[SHARED_UP], w[SHARED_DOWN]);
        TORCH_CHECK(L.experts.hidden == H, "decode_layers: the gate's hidden size differs from h's");
      } else {
        L.mlp = mlp_layer<T>(required(SHARED_GATE), required(SHARED_UP), required(SHARED_DOWN),
                             "decode_layers: the dense MLP");
        TORCH_CHECK(L.mlp.hidden == H, "decode_layers: the dense MLP's hidden size differs from h's");
      }
    }
    T* hs = h.template data_ptr<T>();
    for (const Layer& L : stack) {
      add_residual(hs, B, H, L.input_norm, rows.eps,
                   [&](const T* x, T* out) { mla_out(L.attention, rows, x, B, out); });
      if (L.moe)
        add_residual(hs, B, H, L.post_norm, rows.eps, [&](const T* x, T* out) { moe_out(L.experts, x, B, out); });
      else
        add_residual(hs, B, H, L.post_norm, rows.eps, [&](const T* x, T* out) { mlp_out(L.mlp, x, B, out); });
    }
    if (final_norm)  // h is the last layer's fresh sum: normed in place
      rms_norm_rows(hs, B, H, H, weight_data<T>(final_norm->contiguous(), H, "decode_layers: final_norm"),
                    static_cast<float>(final_eps));
    if (!head) return h;
    // the logits [B, V]: rounded to the dtype (the head's product as the torch path rounds it), then float32
    const auto w = head->contiguous();
    TORCH_CHECK(w.dim() == 2 && w.size(1) == H, "decode_layers: the head's weight [V, H]");
    const int64_t V = w.size(0);
    auto logits = at::empty({B, V}, h.options().dtype(at::kFloat));
    T* rounded = std::is_same_v<T, float> ? reinterpret_cast<T*>(logits.data_ptr<float>()) : scratch<T, 60>(B * V);
    small_matmul(Product<T>{hs, 1, B, H, 0, H, weight_data<T>(w, V * H, "decode_layers: the head's weight"), V,
                            rounded});
    if constexpr (!std::is_same_v<T, float>) {
      float* out = logits.data_ptr<float>();
      for (int64_t i = 0; i < B * V; ++i) out[i] = static_cast<float>(rounded[i]);
    }
    return logits;
  };
  const auto out = dtype == at::kBFloat16 ? run(bf16(0.0f)) : run(0.0f);
  return steps ? out.unsqueeze(1) : out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsv2_cpu, m) {
  m.def(
      "decode_layers(Tensor h, Tensor cos, Tensor sin, Tensor(a!) cache, Tensor write_slots, Tensor read_slots, "
      "Tensor lengths, Tensor?[] weights, float eps, float scale, int top_k, bool group_limited, int n_group, "
      "int topk_group, bool norm_topk_prob, float routed_scaling_factor, Tensor? final_norm=None, "
      "float final_eps=1e-6, Tensor? head=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv2_cpu, CPU, m) { m.impl("decode_layers", &decode_layers); }
