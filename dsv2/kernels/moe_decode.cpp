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

// The gate's scores [N, E] = softmax(x · W_gateᵀ) in float32, x [N, H] and the weight [E, H] (bf16 or float32, H a
// multiple of 16) widened to float32 exactly, as MoEGate computes them (there through float32 copies of both, torch's
// linear and softmax: ~20 µs of small operations per layer at batch 1).
template <typename TX, typename TW>
at::Tensor gate_scores(const at::Tensor& x, const at::Tensor& weight) {
  const int64_t N = x.size(0), E = weight.size(0), H = x.size(1);
  auto scores = at::empty({N, E}, x.options().dtype(at::kFloat));
  const TX* xs = x.data_ptr<TX>();
  const TW* ws = weight.data_ptr<TW>();
  float* out = scores.data_ptr<float>();
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
  return scores;
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

// down(silu(gate · x) * (up · x)) for a few rows, rounded to T after each operation as torch's ops round.
template <typename T>
at::Tensor swiglu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down) {
  auto g = small_matmul(x, gate), u = small_matmul(x, up);  // [N, I]
  T* gs = g.data_ptr<T>();
  const T* us = u.data_ptr<T>();
  for (int64_t i = 0; i < g.numel(); ++i) {
    const float v = static_cast<float>(gs[i]);
    gs[i] = static_cast<T>(static_cast<float>(static_cast<T>(v / (1.0f + std::exp(-v)))) * static_cast<float>(us[i]));
  }
  return small_matmul(g, down);
}

}  // namespace

namespace dsv2_cpu {

at::Tensor moe_decode(const at::Tensor& x_in, const at::Tensor& gate_weight, int64_t top_k, bool group_limited,
                      int64_t n_group, int64_t topk_group, bool norm_topk_prob, double routed_scaling_factor,
                      const at::Tensor& expert_gate, const at::Tensor& expert_up, const at::Tensor& expert_down,
                      const std::optional<at::Tensor>& shared_gate, const std::optional<at::Tensor>& shared_up,
                      const std::optional<at::Tensor>& shared_down, const std::optional<at::Tensor>& input_norm,
                      double eps) {
  if (input_norm)  // x is the residual stream h: h + moe(norm(h))
    return residual_of(x_in, *input_norm, eps, [&](const at::Tensor& normed) {
      return moe_decode(normed, gate_weight, top_k, group_limited, n_group, topk_group, norm_topk_prob,
                        routed_scaling_factor, expert_gate, expert_up, expert_down, shared_gate, shared_up,
                        shared_down, std::nullopt, eps);
    });
  TORCH_CHECK(x_in.dim() == 2 && gate_weight.dim() == 2 && gate_weight.size(1) == x_in.size(1),
              "moe_decode: x [N, H] and the gate's weight [E, H]");
  const int64_t N = x_in.size(0), E = gate_weight.size(0);
  TORCH_CHECK(top_k >= 1 && top_k <= E && (!group_limited || (n_group >= 1 && E % n_group == 0 &&
                                                               topk_group >= 1 && topk_group <= n_group)),
              "moe_decode: top_k in [1, E]; group-limited routing needs E divisible into n_group groups");
  TORCH_CHECK(shared_gate.has_value() == shared_up.has_value() && shared_up.has_value() == shared_down.has_value(),
              "moe_decode: all three shared-expert weights or none");
  const auto x = x_in.contiguous(), gate = gate_weight.contiguous();
  const bool x_bf16 = x.scalar_type() == at::kBFloat16, gate_bf16 = gate.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.size(1) % 16 == 0 && (gate_bf16 || gate.scalar_type() == at::kFloat),
              "moe_decode: the hidden size a multiple of 16, the gate's weight bfloat16 or float32");
  const auto scores = x_bf16 ? (gate_bf16 ? gate_scores<bf16, bf16>(x, gate) : gate_scores<bf16, float>(x, gate))
                             : (gate_bf16 ? gate_scores<float, bf16>(x, gate) : gate_scores<float, float>(x, gate));
  auto ids = at::empty({N, top_k}, x.options().dtype(at::kLong));
  auto weights = at::empty({N, top_k}, x.options().dtype(at::kFloat));
  route(scores.data_ptr<float>(), N, E, top_k, group_limited, n_group, topk_group, norm_topk_prob,
        routed_scaling_factor, ids.data_ptr<int64_t>(), weights.data_ptr<float>());
  auto out = routed_experts(x, ids, weights, expert_gate, expert_up, expert_down).to(x.scalar_type());  // [N, H]
  if (!shared_gate) return out;
  const auto shared = x.scalar_type() == at::kBFloat16 ? swiglu<bf16>(x, *shared_gate, *shared_up, *shared_down)
                                                       : swiglu<float>(x, *shared_gate, *shared_up, *shared_down);
  return out.add_(shared);
}

at::Tensor mlp_decode(const at::Tensor& h, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down,
                      const at::Tensor& input_norm, double eps) {
  TORCH_CHECK(h.dim() == 2 && gate.dim() == 2 && up.sizes() == gate.sizes() && down.dim() == 2 &&
                  gate.size(1) == h.size(1) && down.size(0) == h.size(1) && down.size(1) == gate.size(0),
              "mlp_decode: h [N, H], gate and up [I, H], down [H, I]");
  return residual_of(h, input_norm, eps, [&](const at::Tensor& normed) {
    return normed.scalar_type() == at::kBFloat16 ? swiglu<bf16>(normed, gate, up, down)
                                                 : swiglu<float>(normed, gate, up, down);
  });
}

}  // namespace dsv2_cpu

TORCH_LIBRARY_FRAGMENT(dsv2_cpu, m) {
  m.def(
      "moe_decode(Tensor x, Tensor gate_weight, int top_k, bool group_limited, int n_group, int topk_group, "
      "bool norm_topk_prob, float routed_scaling_factor, Tensor expert_gate, Tensor expert_up, Tensor expert_down, "
      "Tensor? shared_gate, Tensor? shared_up, Tensor? shared_down, Tensor? input_norm=None, float eps=1e-6) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv2_cpu, CPU, m) { m.impl("moe_decode", &dsv2_cpu::moe_decode); }
