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
//
// decode_greedy: several such steps with the head in one call, each step's token the first maximum of its logits
// (greedy decoding), fed to the next step at the next position without returning to Python: between two calls
// `generate` spends ~0.3 ms of a ~5.5 ms bf16 step of the benchmark model (sampling, the loop, the plan's checks,
// the second thread asleep meanwhile).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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

// Every layer's weights, the final norm's and the head's, checked before the first layer runs (an error leaves
// the cache as it was), as the raw pointers the layers run on. They point into `held` (the contiguous tensors).
template <typename T>
struct Layer {
  const T *input_norm, *post_norm;
  MlaLayer<T> attention;
  bool moe;
  MoeLayer<T> experts;  // moe
  MlpLayer<T> mlp;  // otherwise
};

struct HeldWeights {
  std::vector<std::optional<at::Tensor>> layers;  // LAYER_SLOTS per layer, contiguous
  at::Tensor norm, head;  // undefined where not given
};

template <typename T>
struct Stack {
  std::vector<Layer<T>> layers;
  const T* norm = nullptr;  // the final norm's weight [H], or nullptr
  const T* head = nullptr;  // the head's weight [V, H], or nullptr
  int64_t V = 0;
};

template <typename T>
Stack<T> checked_stack(const HeldWeights& held, const at::Tensor& cache, const Routing& routing, int64_t H,
                       int64_t rope_half) {
  const int64_t layers = cache.size(0);
  Stack<T> stack;
  stack.layers.resize(layers);
  for (int64_t layer = 0; layer < layers; ++layer) {
    const auto* w = &held.layers[layer * LAYER_SLOTS];
    auto required = [&](int64_t slot) -> const at::Tensor& {
      TORCH_CHECK(w[slot].has_value(), "decode_layers: layer ", layer, " lacks weight slot ", slot);
      return *w[slot];
    };
    Layer<T>& L = stack.layers[layer];
    L.attention = mla_layer<T>(w[Q_PROJ], w[Q_A_PROJ], w[Q_A_NORM], w[Q_B_PROJ], required(KV_A_PROJ),
                               required(KV_A_NORM), required(W_UK_T), required(W_UV), required(O_PROJ), cache[layer]);
    TORCH_CHECK(L.attention.hidden == H && rope_half * 2 == L.attention.rope_dim,
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
  if (held.norm.defined()) stack.norm = weight_data<T>(held.norm, H, "decode_layers: final_norm");
  if (held.head.defined()) {
    TORCH_CHECK(held.head.dim() == 2 && held.head.size(1) == H, "decode_layers: the head's weight [V, H]");
    stack.V = held.head.size(0);
    stack.head = weight_data<T>(held.head, stack.V * H, "decode_layers: the head's weight");
  }
  return stack;
}

// One step of the residual stream hs [B, H] (the embedding's rows), in place: every layer, then the final norm.
template <typename T>
void run_layers(const Stack<T>& stack, const DecodeRows& rows, T* hs, int64_t B, int64_t H, float final_eps) {
  for (const Layer<T>& L : stack.layers) {
    add_residual(hs, B, H, L.input_norm, rows.eps, [&](const T* x, T* out) { mla_out(L.attention, rows, x, B, out); });
    if (L.moe)
      add_residual(hs, B, H, L.post_norm, rows.eps, [&](const T* x, T* out) { moe_out(L.experts, x, B, out); });
    else
      add_residual(hs, B, H, L.post_norm, rows.eps, [&](const T* x, T* out) { mlp_out(L.mlp, x, B, out); });
  }
  if (stack.norm) rms_norm_rows(hs, B, H, H, stack.norm, final_eps);  // the last layer's sum, in place
}

// The head's product of the normed rows hs [B, H]: [B, V] in T (rounded as the head's own product rounds them).
template <typename T>
T* head_rows(const Stack<T>& stack, const T* hs, int64_t B, int64_t H) {
  T* out = scratch<T, 60>(B * stack.V);
  small_matmul(Product<T>{hs, 1, B, H, 0, H, stack.head, stack.V, out});
  return out;
}

// The call's weights as contiguous tensors, the sizes of cache and weights checked against each other.
HeldWeights hold(const at::Tensor& cache, const std::vector<std::optional<at::Tensor>>& weights,
                 const std::optional<at::Tensor>& final_norm, const std::optional<at::Tensor>& head) {
  TORCH_CHECK(!head || final_norm, "decode_layers: the output head takes the final norm's result (final_norm)");
  const int64_t layers = cache.dim() == 3 ? cache.size(0) : -1;
  TORCH_CHECK(layers >= 1 && static_cast<int64_t>(weights.size()) == layers * LAYER_SLOTS,
              "decode_layers: cache [layers, slots, r + d_R] and ", LAYER_SLOTS, " weight slots per layer");
  HeldWeights held;
  held.layers.resize(weights.size());  // the same tensors, mostly
  for (size_t i = 0; i < weights.size(); ++i)
    if (weights[i]) held.layers[i] = weights[i]->contiguous();
  if (final_norm) held.norm = final_norm->contiguous();
  if (head) held.head = head->contiguous();
  return held;
}

at::ScalarType step_dtype(const at::Tensor& embed) {
  const auto dtype = embed.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "decode_layers: bfloat16 or float32");
  return dtype;
}

at::Tensor decode_layers(const at::Tensor& input_ids, const at::Tensor& embed, const at::Tensor& positions,
                         const at::Tensor& cos_table, const at::Tensor& sin_table, const at::Tensor& cache,
                         const at::Tensor& read_slots,
                         const std::vector<std::optional<at::Tensor>>& weights, double eps, double scale,
                         int64_t top_k, bool group_limited, int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                         double routed_scaling_factor, const std::optional<at::Tensor>& final_norm, double final_eps,
                         const std::optional<at::Tensor>& head) {
  const bool model_step = input_ids.dim() == 2;  // the model's [B, 1] step: the result [B, 1, ·]
  const auto held = hold(cache, weights, final_norm, head);
  auto h = embedding_rows(input_ids, embed);  // [B, H]: the residual stream, updated in place layer after layer
  const auto dtype = step_dtype(h);
  const int64_t B = h.size(0), H = h.size(1);
  const TableRows step("decode_layers", B, positions, cos_table, sin_table, read_slots, eps, scale);
  const Routing routing{top_k, group_limited, n_group, topk_group, norm_topk_prob, routed_scaling_factor};
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const auto stack = checked_stack<T>(held, cache, routing, H, cos_table.size(1));
    T* hs = h.template data_ptr<T>();
    run_layers(stack, step.rows, hs, B, H, static_cast<float>(final_eps));
    if (!stack.head) return h;
    // the logits [B, V]: rounded to the dtype (the head's product as the torch path rounds it), then float32
    auto logits = at::empty({B, stack.V}, h.options().dtype(at::kFloat));
    const T* rounded = head_rows(stack, hs, B, H);
    std::copy_n(rounded, B * stack.V, logits.template data_ptr<float>());
    return logits;
  };
  const auto out = dtype == at::kBFloat16 ? run(bf16(0.0f)) : run(0.0f);
  return model_step ? out.unsqueeze(1) : out;
}

// The first maximum's index of x [n] (NaN counting as the maximum, as torch's max does).
template <typename T>
int64_t first_max(const T* x, int64_t n) {
  int64_t best = 0;
  float top = static_cast<float>(x[0]);
  for (int64_t i = 0; i < n && !std::isnan(top); ++i) {
    const float v = static_cast<float>(x[i]);
    if (v > top || std::isnan(v)) top = v, best = i;
  }
  return best;
}

// Up to `steps` greedy decoding steps in one call, each what `decode_layers` with the head computes followed by the
// first maximum of each row's logits (torch's `max(dim=-1).indices` of them): the token drawn is the next step's
// input at the next position. The call ends early after a step where every row has drawn one of stop_ids or was
// among finished_rows (rows already done, which go on computing as in a step of them all). → the tokens drawn
// [B, n], n ≤ steps. Every row's last position (positions + steps - 1) must lie in the tables and its read slots.
at::Tensor decode_greedy(const at::Tensor& input_ids, const at::Tensor& embed, const at::Tensor& positions,
                         const at::Tensor& cos_table, const at::Tensor& sin_table, const at::Tensor& cache,
                         const at::Tensor& read_slots,
                         const std::vector<std::optional<at::Tensor>>& weights, double eps, double scale,
                         int64_t top_k, bool group_limited, int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                         double routed_scaling_factor, const at::Tensor& final_norm, double final_eps,
                         const at::Tensor& head, int64_t steps, at::IntArrayRef stop_ids,
                         at::IntArrayRef finished_rows) {
  TORCH_CHECK(steps >= 1, "decode_greedy: steps must be at least 1; got ", steps);
  const auto held = hold(cache, weights, final_norm, head);
  auto ids = input_ids.to(at::kLong).flatten().clone();  // [B]: each step's tokens, then the tokens it drew
  const auto dtype = step_dtype(embed);
  const int64_t B = ids.numel(), H = embed.size(-1);
  auto pos = positions.to(at::kLong).flatten().clone();  // [B]: each step's positions
  TORCH_CHECK(pos.numel() == B, "decode_greedy: positions [B] or [B, 1] for the ", B, " rows; got ",
              positions.sizes());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t last = pos.data_ptr<int64_t>()[b] + steps - 1;
    TORCH_CHECK(last < cos_table.size(0) && read_slots.dim() == 2 && last < read_slots.size(1), "decode_greedy: row ",
                b, "'s last position ", last, " (", steps, " steps) is outside the RoPE tables (", cos_table.size(0),
                " positions) or its read slots");
  }
  std::vector<bool> finished(B, false);
  for (const int64_t row : finished_rows) {
    TORCH_CHECK(row >= 0 && row < B, "decode_greedy: finished row ", row, " is not one of the ", B, " rows");
    finished[row] = true;
  }
  const Routing routing{top_k, group_limited, n_group, topk_group, norm_topk_prob, routed_scaling_factor};
  auto tokens = at::empty({B, steps}, ids.options());
  int64_t* drawn = tokens.data_ptr<int64_t>();
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const auto stack = checked_stack<T>(held, cache, routing, H, cos_table.size(1));
    TORCH_CHECK(stack.V <= embed.size(0), "decode_greedy: the head's ", stack.V, " rows exceed the embedding's ",
                embed.size(0), " (a drawn token could not be the next step's input)");
    for (int64_t s = 0; s < steps; ++s) {
      auto h = embedding_rows(ids, embed);  // [B, H]
      const TableRows step("decode_greedy", B, pos, cos_table, sin_table, read_slots, eps, scale);
      T* hs = h.template data_ptr<T>();
      run_layers(stack, step.rows, hs, B, H, static_cast<float>(final_eps));
      const T* logits = head_rows(stack, hs, B, H);  // [B, V]
      bool all_done = true;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t token = first_max(logits + b * stack.V, stack.V);
        drawn[b * steps + s] = ids.data_ptr<int64_t>()[b] = token;
        ++pos.data_ptr<int64_t>()[b];
        finished[b] = finished[b] || std::find(stop_ids.begin(), stop_ids.end(), token) != stop_ids.end();
        all_done = all_done && finished[b];
      }
      if (all_done) return s + 1;
    }
    return steps;
  };
  const int64_t n = dtype == at::kBFloat16 ? run(bf16(0.0f)) : run(0.0f);
  return tokens.narrow(1, 0, n).contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsv2_cpu, m) {
  m.def(
      "decode_layers(Tensor input_ids, Tensor embed, Tensor positions, Tensor rope_cos, Tensor rope_sin, "
      "Tensor(a!) cache, Tensor read_slots, Tensor?[] weights, float eps, float scale, int top_k, "
      "bool group_limited, int n_group, int topk_group, bool norm_topk_prob, float routed_scaling_factor, "
      "Tensor? final_norm=None, float final_eps=1e-6, Tensor? head=None) -> Tensor");
  m.def(
      "decode_greedy(Tensor input_ids, Tensor embed, Tensor positions, Tensor rope_cos, Tensor rope_sin, "
      "Tensor(a!) cache, Tensor read_slots, Tensor?[] weights, float eps, float scale, int top_k, "
      "bool group_limited, int n_group, int topk_group, bool norm_topk_prob, float routed_scaling_factor, "
      "Tensor final_norm, float final_eps, Tensor head, int steps, int[] stop_ids=[], int[] finished_rows=[]) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv2_cpu, CPU, m) {
  m.impl("decode_layers", &decode_layers);
  m.impl("decode_greedy", &decode_greedy);
}
