// A decoding step through the whole decoder stack for a few sequences (one token each), in one call: each layer's
// attention half (mla_decode) then its MoE half (moe_decode) or dense half (mlp_decode), each computing exactly what
// its own call computes, without the Python that runs between 2 calls per layer (module calls, the checks of which
// path applies, ~20 arguments converted per call): ~20% of a bf16 batch-1 step of the benchmark model. The layers
// run on raw pointers (`mla_out`, `moe_out`, `mlp_out`) with the residual stream updated in place: no torch operation
// per layer (~80 of ~1 µs each before, on the calling thread while the other waited: a bf16 batch-1 step 1.09×,
// float32 1.05×, same-process A/B on the benchmark model).
//
//   input_ids  the step's token ids [B] or the model's [B, 1]: the rows of the residual stream are theirs in embed
//            [V, H] (the model's embedding, taken here: no torch operation for it), whose dtype the step computes in
//   positions  each row's position [B] or [B, 1]: its RoPE rotation (a row of the cos and sin tables [P, d_R/2],
//            float32, row p for position p: the model's own values, no cos or sin computed here), its write slot
//            (read_slots[b][position]) and its length (position + 1)
//   weights  LAYER_SLOTS entries per layer, in the order of `Slot` (dsv2/model/decode_plan.py's DECODE_LAYER_SLOTS,
//            the same order): None where a layer has no such weight (q_proj or q_a_proj/q_a_norm/q_b_proj; a dense
//            layer has no gate and no routed experts, and its MLP takes the shared experts' slots)
//   cache    [layers, slots, r + d_R]: each layer's latent cache, read by each row's read slots [B, S] (entry s: the
//            slot of position s) up to its length and written at its write slot
//   final_norm  the model's last RMSNorm (eps final_eps), applied to the result when given
//   head     the output head's weight [V, H]: with final_norm, the call returns the logits [B, V] in float32 (rounded
//            to h's dtype first, as the head's own product rounds them) instead of h
// The result is [B, 1, ·] where input_ids came as [B, 1], [B, ·] otherwise.
#include <torch/library.h>

#include <cstring>
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

// The step's residual stream [B, H]: embed's rows of the token ids [B] or [B, 1].
at::Tensor embedding_rows(const at::Tensor& input_ids, const at::Tensor& embed) {
  TORCH_CHECK(!at::isFloatingType(input_ids.scalar_type()) &&
                  (input_ids.dim() == 1 || (input_ids.dim() == 2 && input_ids.size(1) == 1)),
              "decode_layers: token ids [B] or [B, 1]; got ", input_ids.sizes(), " ", input_ids.scalar_type());
  const auto table = embed.contiguous();
  TORCH_CHECK(table.dim() == 2 && table.device().is_cpu(), "decode_layers: embed [vocab, H] on the CPU");
  const auto ids = input_ids.to(at::kLong).contiguous();
  const int64_t B = ids.numel(), V = table.size(0), H = table.size(1);
  auto rows = at::empty({B, H}, table.options());
  const auto row_bytes = H * table.element_size();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t id = ids.data_ptr<int64_t>()[b];
    TORCH_CHECK(id >= 0 && id < V, "decode_layers: token id ", id, " (row ", b, ") is outside the embedding's ", V,
                " rows");
    std::memcpy(static_cast<char*>(rows.data_ptr()) + b * row_bytes,
                static_cast<const char*>(table.data_ptr()) + id * row_bytes, row_bytes);
  }
  return rows;
}

at::Tensor decode_layers(const at::Tensor& input_ids, const at::Tensor& embed, const at::Tensor& positions,
                         const at::Tensor& cos_table, const at::Tensor& sin_table, const at::Tensor& cache,
                         const at::Tensor& read_slots,
                         const std::vector<std::optional<at::Tensor>>& weights, double eps, double scale,
                         int64_t top_k, bool group_limited, int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                         double routed_scaling_factor, const std::optional<at::Tensor>& final_norm, double final_eps,
                         const std::optional<at::Tensor>& head) {
  TORCH_CHECK(!head || final_norm, "decode_layers: the output head takes the final norm's result (final_norm)");
  const bool steps = input_ids.dim() == 2;  // the model's [B, 1] step: the result [B, 1, ·]
  auto h = embedding_rows(input_ids, embed);  // [B, H]: the residual stream, updated in place layer after layer
  const int64_t layers = cache.dim() == 3 ? cache.size(0) : -1;
  TORCH_CHECK(layers >= 1 && static_cast<int64_t>(weights.size()) == layers * LAYER_SLOTS,
              "decode_layers: cache [layers, slots, r + d_R] and ", LAYER_SLOTS, " weight slots per layer");
  const auto dtype = h.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "decode_layers: bfloat16 or float32");
  const int64_t B = h.size(0), H = h.size(1);
  const TableRows step("decode_layers", B, positions, cos_table, sin_table, read_slots, eps, scale);
  const DecodeRows& rows = step.rows;
  const Routing routing{top_k, group_limited, n_group, topk_group, norm_topk_prob, routed_scaling_factor};
  std::vector<std::optional<at::Tensor>> held(weights.size());  // contiguous weights (the same tensors, mostly)
  for (size_t i = 0; i < weights.size(); ++i)
    if (weights[i]) held[i] = weights[i]->contiguous();
  auto run = [&](auto zero) {
    using T = decltype(zero);
    // every weight checked before the first layer runs (an error leaves the cache as it was)
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
      TORCH_CHECK(L.attention.hidden == H && cos_table.size(1) * 2 == L.attention.rope_dim,
                  "decode_layers: sizes disagree (h [B, H] and the RoPE tables [P, d_R/2] against the weights)");
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
    // and the final norm's and the head's
    const auto norm_w = final_norm ? final_norm->contiguous() : at::Tensor();
    const T* norm = final_norm ? weight_data<T>(norm_w, H, "decode_layers: final_norm") : nullptr;
    const auto head_w = head ? head->contiguous() : at::Tensor();
    TORCH_CHECK(!head || (head_w.dim() == 2 && head_w.size(1) == H), "decode_layers: the head's weight [V, H]");
    const int64_t V = head ? head_w.size(0) : 0;
    const T* head_data = head ? weight_data<T>(head_w, V * H, "decode_layers: the head's weight") : nullptr;
    T* hs = h.template data_ptr<T>();
    for (const Layer& L : stack) {
      add_residual(hs, B, H, L.input_norm, rows.eps,
                   [&](const T* x, T* out) { mla_out(L.attention, rows, x, B, out); });
      if (L.moe)
        add_residual(hs, B, H, L.post_norm, rows.eps, [&](const T* x, T* out) { moe_out(L.experts, x, B, out); });
      else
        add_residual(hs, B, H, L.post_norm, rows.eps, [&](const T* x, T* out) { mlp_out(L.mlp, x, B, out); });
    }
    if (norm) rms_norm_rows(hs, B, H, H, norm, static_cast<float>(final_eps));  // the last layer's sum, in place
    if (!head) return h;
    // the logits [B, V]: rounded to the dtype (the head's product as the torch path rounds it), then float32
    auto logits = at::empty({B, V}, h.options().dtype(at::kFloat));
    T* rounded = std::is_same_v<T, float> ? reinterpret_cast<T*>(logits.data_ptr<float>()) : scratch<T, 60>(B * V);
    small_matmul(Product<T>{hs, 1, B, H, 0, H, head_data, V, rounded});
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
      "decode_layers(Tensor input_ids, Tensor embed, Tensor positions, Tensor rope_cos, Tensor rope_sin, "
      "Tensor(a!) cache, Tensor read_slots, Tensor?[] weights, float eps, float scale, int top_k, "
      "bool group_limited, int n_group, int topk_group, bool norm_topk_prob, float routed_scaling_factor, "
      "Tensor? final_norm=None, float final_eps=1e-6, Tensor? head=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv2_cpu, CPU, m) { m.impl("decode_layers", &decode_layers); }
