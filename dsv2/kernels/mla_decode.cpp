// One decoding step of Multi-head Latent Attention for a few sequences (one token each), in one call: what
// dsv2/model/attention.py's absorbed path computes, op for op with the same roundings, without the ~150 small torch
// operations (views, casts, complex RoPE, norms: ~0.3-0.6 ms per layer at batch 1) between its kernels.
//
//   q       = x · W_Qᵀ, or q_b(norm(q_a(x)))                         [B, n_h, d + d_R] = q_nope | q_pe
//   latent  = norm(c) | rope(k_pe),  c | k_pe = x · W_KV_aᵀ         [B, r + d_R], written to the cache
//   q̃       = q_nope · W_UK | rope(q_pe)                             [B, n_h, r + d_R]
//   out     = W_O · (W_UV · latent_attention(q̃, cache))              [B, H]
//
// The products go through small_matmul (each weight streamed once), the attention through latent_attention (the
// cache read where it lies). bf16 rounds where the torch path does: after every product, the norm's cast and its
// scaling, and RoPE's result; RMSNorm and RoPE compute in float32. Given the decoder layer's norm (input_norm), x is
// the residual stream h and the call returns h + out(norm(h)). `mla_out` computes it on raw pointers, its
// intermediates in per-thread buffers: the operator converts its tensors once, `decode_layers` calls it per layer
// without any torch operation.
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "common.h"

namespace {

using namespace dsv2_cpu;

// Rotate interleaved pairs (x[2i], x[2i+1]) of x [n] by cos/sin [n/2] (float32), writing to out.
template <typename T>
void rope(const T* x, const float* cos, const float* sin, int64_t n, T* out) {
  for (int64_t i = 0; i < n / 2; ++i) {
    const float a = static_cast<float>(x[2 * i]), b = static_cast<float>(x[2 * i + 1]);
    out[2 * i] = static_cast<T>(a * cos[i] - b * sin[i]);
    out[2 * i + 1] = static_cast<T>(a * sin[i] + b * cos[i]);
  }
}

}  // namespace

namespace dsv2_cpu {

template <typename T>
void mla_out(const MlaLayer<T>& L, const DecodeRows& rows, const T* x, int64_t B, T* out) {
  const int64_t H = L.hidden, heads = L.heads, r = L.r, nope = L.nope, rope_dim = L.rope_dim, v = L.v;
  const int64_t qk = nope + rope_dim, D = r + rope_dim;
  // the queries [B, n_h·(d + d_R)] = q_nope | q_pe per head, and the latent's c | k_pe [B, r + d_R]: both products
  // of x in one pass
  T* q = scratch<T, 30>(B * heads * qk);
  T* kv = scratch<T, 32>(B * D);
  const Product<T> latent{x, 1, B, H, 0, H, L.kv_a_proj, D, kv};
  if (L.q_proj) {
    small_matmul({Product<T>{x, 1, B, H, 0, H, L.q_proj, heads * qk, q}, latent});
  } else {
    T* q_a = scratch<T, 31>(B * L.q_rank);
    small_matmul({Product<T>{x, 1, B, H, 0, H, L.q_a_proj, L.q_rank, q_a}, latent});
    rms_norm_rows(q_a, B, L.q_rank, L.q_rank, L.q_a_norm, rows.eps);
    small_matmul(Product<T>{q_a, 1, B, L.q_rank, 0, L.q_rank, L.q_b_proj, heads * qk, q});
  }
  // the latent: normed c | roped k_pe, written to each sequence's slot
  rms_norm_rows(kv, B, r, D, L.kv_a_norm, rows.eps);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t slot = rows.write_slots[b];
    TORCH_CHECK(slot >= 0 && slot < L.num_slots, "mla_decode: write slot out of range");
    T* dst = L.cache + slot * L.row_stride;
    std::copy(kv + b * D, kv + b * D + r, dst);
    rope(kv + b * D + r, rows.cos + b * rope_dim / 2, rows.sin + b * rope_dim / 2, rope_dim, dst + r);
  }
  // the absorbed queries: q_nope · W_UK per head [n_h, B, r], then the roped q_pe
  T* q_latent = scratch<T, 33>(heads * B * r);
  small_matmul(Product<T>{q, heads, B, nope, qk, heads * qk, L.w_uk_t, r, q_latent});
  T* q_abs = scratch<T, 34>(B * heads * D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      T* dst = q_abs + (b * heads + h) * D;
      std::copy(q_latent + (h * B + b) * r, q_latent + (h * B + b + 1) * r, dst);
      rope(q + (b * heads + h) * qk + nope, rows.cos + b * rope_dim / 2, rows.sin + b * rope_dim / 2, rope_dim,
           dst + r);
    }
  T* out_latent = scratch<T, 35>(B * heads * r);  // [B, n_h, r]
  latent_attention(Attention<T>{q_abs, B, heads, D, L.cache, L.num_slots, L.row_stride, rows.read_slots, rows.S,
                                rows.lengths, r, rows.scale, out_latent});
  T* values = scratch<T, 36>(heads * B * v);  // [n_h, B, v]
  small_matmul(Product<T>{out_latent, heads, B, r, r, heads * r, L.w_uv, v, values});
  T* heads_out = values;  // [B, n_h·v]: the same layout for one row
  if (B > 1) {
    heads_out = scratch<T, 37>(B * heads * v);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < heads; ++h)
        std::copy(values + (h * B + b) * v, values + (h * B + b + 1) * v, heads_out + (b * heads + h) * v);
  }
  small_matmul(Product<T>{heads_out, 1, B, heads * v, 0, heads * v, L.o_proj, H, out});
}

template void mla_out(const MlaLayer<bf16>& L, const DecodeRows& rows, const bf16* x, int64_t B, bf16* out);
template void mla_out(const MlaLayer<float>& L, const DecodeRows& rows, const float* x, int64_t B, float* out);

template <typename T>
MlaLayer<T> mla_layer(const std::optional<at::Tensor>& q_proj, const std::optional<at::Tensor>& q_a_proj,
                      const std::optional<at::Tensor>& q_a_norm, const std::optional<at::Tensor>& q_b_proj,
                      const at::Tensor& kv_a_proj, const at::Tensor& kv_a_norm, const at::Tensor& w_uk_t,
                      const at::Tensor& w_uv, const at::Tensor& o_proj, const at::Tensor& cache) {
  TORCH_CHECK(cache.dim() == 2 && w_uk_t.dim() == 3 && w_uv.dim() == 3 && o_proj.dim() == 2 && kv_a_proj.dim() == 2,
              "mla_decode: cache [slots, r + d_R], w_uk_t [n_h, r, d], w_uv [n_h, v, r], o_proj [H, n_h·v]");
  TORCH_CHECK(q_proj.has_value() != (q_a_proj.has_value() && q_a_norm.has_value() && q_b_proj.has_value()),
              "mla_decode: either q_proj or q_a_proj, q_a_norm and q_b_proj");
  MlaLayer<T> L{};
  L.hidden = kv_a_proj.size(1), L.heads = w_uk_t.size(0), L.r = w_uk_t.size(1), L.nope = w_uk_t.size(2);
  L.v = w_uv.size(1);
  const at::Tensor& q_out = q_proj ? *q_proj : *q_b_proj;  // [n_h·(d + d_R), H or q_lora_rank]
  const int64_t qk = q_out.size(0) / L.heads;
  L.rope_dim = qk - L.nope;
  const int64_t D = L.r + L.rope_dim;
  TORCH_CHECK(q_out.dim() == 2 && q_out.size(0) == L.heads * qk && L.rope_dim > 0 && L.rope_dim % 2 == 0 &&
                  kv_a_proj.size(0) == D && cache.size(1) == D && kv_a_norm.numel() == L.r &&
                  w_uv.size(0) == L.heads && w_uv.size(2) == L.r && o_proj.size(0) == L.hidden &&
                  o_proj.size(1) == L.heads * L.v && cache.stride(1) == 1,
              "mla_decode: sizes disagree (q [B, n_h·(d + d_R)], latent r + d_R = the cache's row, W_UV [n_h, v, r], "
              "o_proj [H, n_h·v], cache rows contiguous)");
  auto data = [](const at::Tensor& t) { return weight_data<T>(t, t.numel(), "mla_decode: a weight"); };
  if (q_proj) {
    TORCH_CHECK(q_proj->size(1) == L.hidden, "mla_decode: q_proj [n_h·(d + d_R), H]");
    L.q_proj = data(*q_proj);
  } else {
    L.q_rank = q_a_proj->size(0);
    TORCH_CHECK(q_a_proj->dim() == 2 && q_a_proj->size(1) == L.hidden && q_a_norm->numel() == L.q_rank &&
                    q_b_proj->size(1) == L.q_rank,
                "mla_decode: q_a_proj [q_lora_rank, H], q_a_norm [q_lora_rank], q_b_proj [n_h·(d + d_R), q_lora_rank]");
    L.q_a_proj = data(*q_a_proj), L.q_a_norm = data(*q_a_norm), L.q_b_proj = data(*q_b_proj);
  }
  constexpr int64_t k = K_MULTIPLE<T>;
  TORCH_CHECK(L.hidden % k == 0 && L.nope % k == 0 && L.r % k == 0 && (L.heads * L.v) % k == 0 && L.q_rank % k == 0 &&
                  D % KSTEP == 0 && L.r % TILE == 0,
              "mla_decode: the hidden size, d, r, n_h·v and q_lora_rank must be multiples of ", k,
              ", r + d_R of 32");
  L.kv_a_proj = data(kv_a_proj), L.kv_a_norm = data(kv_a_norm), L.w_uk_t = data(w_uk_t), L.w_uv = data(w_uv);
  L.o_proj = data(o_proj);
  TORCH_CHECK(cache.device().is_cpu() && cache.scalar_type() == c10::CppTypeToScalarType<T>::value,
              "mla_decode: tensors of x's dtype on the CPU (the cache)");
  L.cache = cache.data_ptr<T>(), L.num_slots = cache.size(0), L.row_stride = cache.stride(0);
  return L;
}

template MlaLayer<bf16> mla_layer(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&);
template MlaLayer<float> mla_layer(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&);

at::Tensor mla_decode(const at::Tensor& x, const std::optional<at::Tensor>& q_proj,
                      const std::optional<at::Tensor>& q_a_proj, const std::optional<at::Tensor>& q_a_norm,
                      const std::optional<at::Tensor>& q_b_proj, const at::Tensor& kv_a_proj,
                      const at::Tensor& kv_a_norm, const at::Tensor& w_uk_t, const at::Tensor& w_uv,
                      const at::Tensor& o_proj, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache,
                      const at::Tensor& write_slots, const at::Tensor& read_slots, const at::Tensor& lengths,
                      double eps, double scale, const std::optional<at::Tensor>& input_norm) {
  TORCH_CHECK(x.dim() == 2, "mla_decode: x [B, H]");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "mla_decode: bfloat16 or float32");
  const int64_t B = x.size(0);
  const StepRows step("mla_decode", B, cos, sin, write_slots, read_slots, lengths, eps, scale);
  const DecodeRows& rows = step.rows;
  const auto q_w = contiguous_if_given(q_proj), q_a_w = contiguous_if_given(q_a_proj);
  const auto q_a_n = contiguous_if_given(q_a_norm), q_b_w = contiguous_if_given(q_b_proj);
  const auto kv_a_w = kv_a_proj.contiguous(), kv_a_n = kv_a_norm.contiguous(), uk = w_uk_t.contiguous();
  const auto uv = w_uv.contiguous(), o_w = o_proj.contiguous();
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const auto L = mla_layer<T>(q_w, q_a_w, q_a_n, q_b_w, kv_a_w, kv_a_n, uk, uv, o_w, cache);
    TORCH_CHECK(x.size(1) == L.hidden && cos.size(1) * 2 == L.rope_dim,
                "mla_decode: sizes disagree (x [B, H] and cos [B, d_R/2] against the weights)");
    return rows_through<T>(x, input_norm, eps, [&](const T* x_rows, T* out) { mla_out(L, rows, x_rows, B, out); });
  };
  return dtype == at::kBFloat16 ? run(bf16(0.0f)) : run(0.0f);
}

}  // namespace dsv2_cpu

TORCH_LIBRARY_FRAGMENT(dsv2_cpu, m) {
  m.def(
      "mla_decode(Tensor x, Tensor? q_proj, Tensor? q_a_proj, Tensor? q_a_norm, Tensor? q_b_proj, Tensor kv_a_proj, "
      "Tensor kv_a_norm, Tensor w_uk_t, Tensor w_uv, Tensor o_proj, Tensor cos, Tensor sin, Tensor(a!) cache, "
      "Tensor write_slots, Tensor read_slots, Tensor lengths, float eps, float scale, Tensor? input_norm=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv2_cpu, CPU, m) { m.impl("mla_decode", &dsv2_cpu::mla_decode); }
