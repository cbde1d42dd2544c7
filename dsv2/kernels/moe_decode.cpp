// One decoding step of a DeepSeekMoE layer for a few tokens, in one call: what dsv2/model/moe.py's MoE computes, with
// the same roundings, without the small torch operations around its kernels (the gate's softmax and top-k, the shared
// experts' SwiGLU, the casts and the sum: ~0.2 ms per layer at batch 1).
//
//   scores  = softmax(x · W_gateᵀ) in float32, top-k experts (greedy, or within the top groups), their weights
//             renormalized (norm_topk_prob) or scaled by routed_scaling_factor
//   out     = Σ_k weight · expert(x)  (routed_experts, float32 sum, cast to the dtype)  +  shared(x)
//   shared  = down(silu(gate(x)) * up(x)), each product through small_matmul, rounded as the torch path rounds
// Given the layer's norm (input_norm), x is the residual stream h and the call returns h + out(norm(h)).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <vector>

#include "common.h"

namespace {

using namespace dsv2_cpu;

// The gate's scores out [N, E] = softmax(x · W_gateᵀ) in float32, x [N, H] and the weight [E, H] (bf16 or float32, H
// a multiple of 16) widened to float32 exactly, as MoEGate computes them (there through float32 copies of both,
// torch's linear and softmax: ~20 µs of small operations per layer at batch 1).
template <typename TX, typename TW>
void gate_scores(const TX* xs, int64_t N, int64_t H, const TW* ws, int64_t E, float* out) {
  at::parallel_for(0, N, std::max<int64_t>(1, (1 << 18) / (E * H)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* row = out + n * E;
      for (int64_t e = 0; e < E; ++e) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < H; k += 16)
          acc = _mm512_fmadd_ps(load_f32(xs + n * H + k), load_f32(ws + e * H + k), acc);
        row[e] = _mm512_reduce_add_ps(acc);
      }
      const float top = *std::max_element(row, row + E);
      float total = 0.0f;
      for (int64_t e = 0; e < E; ++e) total += (row[e] = std::exp(row[e] - top));
      for (int64_t e = 0; e < E; ++e) row[e] /= total;
    }
  });
}

// The gate's choice for each token: expert ids and combine weights [N, k], as MoEGate picks them.
void route(const float* scores, int64_t N, int64_t E, int64_t k, bool group_limited, int64_t n_group,
           int64_t topk_group, bool norm_topk_prob, double scaling, int64_t* ids, float* weights) {
  std::vector<float> candidates(E), group_best(n_group);
  std::vector<int64_t> order(std::max(E, n_group));
  for (int64_t n = 0; n < N; ++n) {
    const float* s = scores + n * E;
    std::copy(s, s + E, candidates.begin());
    if (group_limited) {  // experts outside the topk_group groups with the best expert score drop to 0
      const int64_t per_group = E / n_group;
      for (int64_t g = 0; g < n_group; ++g)
        group_best[g] = *std::max_element(s + g * per_group, s + (g + 1) * per_group);
      std::iota(order.begin(), order.begin() + n_group, 0);
      std::partial_sort(order.begin(), order.begin() + topk_group, order.begin() + n_group,
                        [&](int64_t a, int64_t b) { return group_best[a] > group_best[b]; });
      std::vector<bool> kept(n_group, false);
      for (int64_t i = 0; i < topk_group; ++i) kept[order[i]] = true;
      for (int64_t e = 0; e < E; ++e)
        if (!kept[e / per_group]) candidates[e] = 0.0f;
    }
    std::iota(order.begin(), order.begin() + E, 0);
    std::partial_sort(order.begin(), order.begin() + k, order.begin() + E,
                      [&](int64_t a, int64_t b) { return candidates[a] > candidates[b]; });
    float total = 0.0f;
    for (int64_t i = 0; i < k; ++i) {
      ids[n * k + i] = order[i];
      weights[n * k + i] = candidates[order[i]];
      total += candidates[order[i]];
    }
    for (int64_t i = 0; i < k; ++i)
      weights[n * k + i] = k > 1 && norm_topk_prob ? weights[n * k + i] / (total + 1e-20f)
                                                    : weights[n * k + i] * static_cast<float>(scaling);
  }
}

// out [N, H] = down(silu(gate · x) * (up · x)) for a few rows x [N, H], gate and up [I, H], down [H, I]: rounded to
// T after each operation as torch's ops round.
template <typename T>
void swiglu(const T* x, int64_t N, int64_t H, const T* gate, const T* up, const T* down, int64_t I, T* out) {
  T* g = scratch<T, 40>(N * I);
  T* u = scratch<T, 41>(N * I);
  small_matmul({Product<T>{x, 1, N, H, 0, H, gate, I, g}, Product<T>{x, 1, N, H, 0, H, up, I, u}});
  for (int64_t i = 0; i < N * I; ++i) {
    const float v = static_cast<float>(g[i]);
    g[i] = static_cast<T>(static_cast<float>(static_cast<T>(v / (1.0f + std::exp(-v)))) * static_cast<float>(u[i]));
  }
  small_matmul(Product<T>{g, 1, N, I, 0, I, down, H, out});
}

}  // namespace

namespace dsv2_cpu {

template <typename T>
void moe_out(const MoeLayer<T>& L, const T* x, int64_t N, T* out) {
  const int64_t H = L.hidden, E = L.experts, k = L.routing.top_k;
  float* scores = scratch<float, 42>(N * E);  // [N, E]
  if (L.gate_bf16)
    gate_scores(x, N, H, static_cast<const bf16*>(L.gate), E, scores);
  else
    gate_scores(x, N, H, static_cast<const float*>(L.gate), E, scores);
  int64_t* ids = scratch<int64_t, 43>(N * k);
  float* weights = scratch<float, 44>(N * k);
  const Routing& r = L.routing;
  route(scores, N, E, k, r.group_limited, r.n_group, r.topk_group, r.norm_topk_prob, r.scaling, ids, weights);
  float* routed = scratch<float, 45>(N * H);  // [N, H] float32 sums
  const bool shared_done = routed_experts(RoutedExperts<T>{
      x, N, H, ids, weights, k, L.expert_gate, L.expert_up, L.expert_down, E, L.expert_inter, routed, L.shared_gate,
      L.shared_up, L.shared_down, L.shared_inter, out});  // the shared experts' output to out, where they ran there
  if (!L.shared_gate) {
    for (int64_t i = 0; i < N * H; ++i) out[i] = static_cast<T>(routed[i]);
    return;
  }
  if (!shared_done) swiglu(x, N, H, L.shared_gate, L.shared_up, L.shared_down, L.shared_inter, out);
  for (int64_t i = 0; i < N * H; ++i)  // the routed sum rounded to T, plus the shared experts' output
    out[i] = static_cast<T>(static_cast<float>(static_cast<T>(routed[i])) + static_cast<float>(out[i]));
}

template void moe_out(const MoeLayer<bf16>& L, const bf16* x, int64_t N, bf16* out);
template void moe_out(const MoeLayer<float>& L, const float* x, int64_t N, float* out);

template <typename T>
void mlp_out(const MlpLayer<T>& L, const T* x, int64_t N, T* out) {
  swiglu(x, N, L.hidden, L.gate, L.up, L.down, L.inter, out);
}

template void mlp_out(const MlpLayer<bf16>& L, const bf16* x, int64_t N, bf16* out);
template void mlp_out(const MlpLayer<float>& L, const float* x, int64_t N, float* out);

template <typename T>
MlpLayer<T> mlp_layer(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down, const char* what) {
  TORCH_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes() && down.dim() == 2 && down.size(0) == gate.size(1) &&
                  down.size(1) == gate.size(0),
              what, ": gate and up [I, H], down [H, I]");
  const int64_t I = gate.size(0), H = gate.size(1);
  TORCH_CHECK(H % K_MULTIPLE<T> == 0 && I % K_MULTIPLE<T> == 0, what, ": the hidden and intermediate sizes must be "
              "multiples of ", K_MULTIPLE<T>, "; got ", H, " and ", I);
  return {weight_data<T>(gate, I * H, what), weight_data<T>(up, I * H, what), weight_data<T>(down, I * H, what), H, I};
}

template MlpLayer<bf16> mlp_layer(const at::Tensor&, const at::Tensor&, const at::Tensor&, const char*);
template MlpLayer<float> mlp_layer(const at::Tensor&, const at::Tensor&, const at::Tensor&, const char*);

template <typename T>
MoeLayer<T> moe_layer(const at::Tensor& gate_weight, const Routing& routing, const at::Tensor& expert_gate,
                      const at::Tensor& expert_up, const at::Tensor& expert_down,
                      const std::optional<at::Tensor>& shared_gate, const std::optional<at::Tensor>& shared_up,
                      const std::optional<at::Tensor>& shared_down) {
  TORCH_CHECK(gate_weight.dim() == 2 && gate_weight.is_contiguous() && gate_weight.device().is_cpu() &&
                  (gate_weight.scalar_type() == at::kBFloat16 || gate_weight.scalar_type() == at::kFloat),
              "moe_decode: the gate's weight [E, H] contiguous, bfloat16 or float32");
  const int64_t E = gate_weight.size(0), H = gate_weight.size(1);
  TORCH_CHECK(H % 16 == 0, "moe_decode: the hidden size a multiple of 16");
  TORCH_CHECK(routing.top_k >= 1 && routing.top_k <= E &&
                  (!routing.group_limited || (routing.n_group >= 1 && E % routing.n_group == 0 &&
                                              routing.topk_group >= 1 && routing.topk_group <= routing.n_group)),
              "moe_decode: top_k in [1, E]; group-limited routing needs E divisible into n_group groups");
  TORCH_CHECK(shared_gate.has_value() == shared_up.has_value() && shared_up.has_value() == shared_down.has_value(),
              "moe_decode: all three shared-expert weights or none");
  TORCH_CHECK(expert_gate.dim() == 3 && expert_up.sizes() == expert_gate.sizes() && expert_gate.size(0) == E &&
                  expert_gate.size(2) == H && expert_down.dim() == 3 && expert_down.size(0) == E &&
                  expert_down.size(1) == H && expert_down.size(2) == expert_gate.size(1) &&
                  H % KSTEP == 0 && expert_gate.size(1) % KSTEP == 0,
              "moe_decode: experts' gate and up [E, I, H], down [E, H, I], H and I multiples of 32");
  MoeLayer<T> L{};
  L.gate = gate_weight.data_ptr(), L.gate_bf16 = gate_weight.scalar_type() == at::kBFloat16;
  L.hidden = H, L.experts = E, L.routing = routing, L.expert_inter = expert_gate.size(1);
  const int64_t expert_values = expert_gate.numel();
  L.expert_gate = weight_data<T>(expert_gate, expert_values, "moe_decode: the experts' gate");
  L.expert_up = weight_data<T>(expert_up, expert_values, "moe_decode: the experts' up");
  L.expert_down = weight_data<T>(expert_down, expert_values, "moe_decode: the experts' down");
  if (shared_gate) {
    const auto shared = mlp_layer<T>(*shared_gate, *shared_up, *shared_down, "moe_decode: the shared experts");
    TORCH_CHECK(shared.hidden == H, "moe_decode: the shared experts' hidden size differs from the gate's");
    L.shared_gate = shared.gate, L.shared_up = shared.up, L.shared_down = shared.down;
    L.shared_inter = shared.inter;
  }
  return L;
}

template MoeLayer<bf16> moe_layer(const at::Tensor&, const Routing&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);
template MoeLayer<float> moe_layer(const at::Tensor&, const Routing&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

at::Tensor moe_decode(const at::Tensor& x, const at::Tensor& gate_weight, int64_t top_k, bool group_limited,
                      int64_t n_group, int64_t topk_group, bool norm_topk_prob, double routed_scaling_factor,
                      const at::Tensor& expert_gate, const at::Tensor& expert_up, const at::Tensor& expert_down,
                      const std::optional<at::Tensor>& shared_gate, const std::optional<at::Tensor>& shared_up,
                      const std::optional<at::Tensor>& shared_down, const std::optional<at::Tensor>& input_norm,
                      double eps) {
  TORCH_CHECK(x.dim() == 2 && gate_weight.dim() == 2 && gate_weight.size(1) == x.size(1),
              "moe_decode: x [N, H] and the gate's weight [E, H]");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "moe_decode: bfloat16 or float32");
  const auto gate = gate_weight.contiguous(), e_gate = expert_gate.contiguous(), e_up = expert_up.contiguous();
  const auto e_down = expert_down.contiguous();
  const auto s_gate = contiguous_if_given(shared_gate), s_up = contiguous_if_given(shared_up);
  const auto s_down = contiguous_if_given(shared_down);
  const Routing routing{top_k, group_limited, n_group, topk_group, norm_topk_prob, routed_scaling_factor};
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const auto L = moe_layer<T>(gate, routing, e_gate, e_up, e_down, s_gate, s_up, s_down);
    return rows_through<T>(x, input_norm, eps, [&](const T* rows, T* out) { moe_out(L, rows, x.size(0), out); });
  };
  return dtype == at::kBFloat16 ? run(bf16(0.0f)) : run(0.0f);
}

at::Tensor mlp_decode(const at::Tensor& h, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down,
                      const at::Tensor& input_norm, double eps) {
  TORCH_CHECK(h.dim() == 2 && (h.scalar_type() == at::kBFloat16 || h.scalar_type() == at::kFloat),
              "mlp_decode: h [N, H], bfloat16 or float32");
  const auto g = gate.contiguous(), u = up.contiguous(), d = down.contiguous();
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const auto L = mlp_layer<T>(g, u, d, "mlp_decode");
    TORCH_CHECK(L.hidden == h.size(1), "mlp_decode: h [N, H], gate and up [I, H], down [H, I]");
    return rows_through<T>(h, input_norm, eps, [&](const T* rows, T* out) { mlp_out(L, rows, h.size(0), out); });
  };
  return h.scalar_type() == at::kBFloat16 ? run(bf16(0.0f)) : run(0.0f);
}

}  // namespace dsv2_cpu

TORCH_LIBRARY_FRAGMENT(dsv2_cpu, m) {
  m.def(
      "moe_decode(Tensor x, Tensor gate_weight, int top_k, bool group_limited, int n_group, int topk_group, "
      "bool norm_topk_prob, float routed_scaling_factor, Tensor expert_gate, Tensor expert_up, Tensor expert_down, "
      "Tensor? shared_gate, Tensor? shared_up, Tensor? shared_down, Tensor? input_norm=None, float eps=1e-6) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv2_cpu, CPU, m) { m.impl("moe_decode", &dsv2_cpu::moe_decode); }
