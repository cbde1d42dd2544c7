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
// the residual stream h and the call returns h + out(norm(h)).
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

template <typename T>
at::Tensor mla_decode_impl(const at::Tensor& x, const at::Tensor& q, const at::Tensor& kv, const at::Tensor& kv_norm,
                           const at::Tensor& w_uk_t, const at::Tensor& w_uv, const at::Tensor& o_proj,
                           const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache,
                           const at::Tensor& write_slots, const at::Tensor& read_slots, const at::Tensor& lengths,
                           double eps, double scale) {
  const int64_t B = x.size(0), heads = w_uk_t.size(0), r = w_uk_t.size(1), nope = w_uk_t.size(2);
  const int64_t qk = q.size(1) / heads, rope_dim = qk - nope, D = r + rope_dim;
  TORCH_CHECK(q.size(1) == heads * qk && rope_dim > 0 && rope_dim % 2 == 0 && kv.size(1) == D && cache.size(1) == D &&
                  kv_norm.numel() == r && cos.size(1) * 2 == rope_dim && w_uv.size(0) == heads && w_uv.size(2) == r,
              "mla_decode: sizes disagree (q [B, n_h·(d + d_R)], latent r + d_R = the cache's row, cos [B, d_R/2], "
              "W_UV [n_h, v, r])");
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  // the latent: normed c | roped k_pe, written to each sequence's slot
  T* kv_rows = kv.data_ptr<T>();  // [B, r + d_R]
  rms_norm_rows(kv_rows, B, r, D, kv_norm.data_ptr<T>(), static_cast<float>(eps));
  T* rows = cache.data_ptr<T>();
  const int64_t* slot = write_slots.data_ptr<int64_t>();
  const int64_t num_slots = cache.size(0), row_stride = cache.stride(0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slot[b] >= 0 && slot[b] < num_slots, "mla_decode: write slot out of range");
    T* dst = rows + slot[b] * row_stride;
    std::copy(kv_rows + b * D, kv_rows + b * D + r, dst);
    rope(kv_rows + b * D + r, c + b * rope_dim / 2, s + b * rope_dim / 2, rope_dim, dst + r);
  }
  // the absorbed queries: q_nope · W_UK per head, then the roped q_pe
  const auto q_heads = q.view({B, heads, qk});
  const auto q_latent = small_matmul(q_heads.permute({1, 0, 2}).slice(2, 0, nope), w_uk_t);  // [n_h, B, r]
  auto q_abs = at::empty({B, heads, D}, x.options());
  T* qa = q_abs.data_ptr<T>();
  const T* ql = q_latent.data_ptr<T>();
  const T* qs = q_heads.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      T* dst = qa + (b * heads + h) * D;
      std::copy(ql + (h * B + b) * r, ql + (h * B + b + 1) * r, dst);
      rope(qs + (b * heads + h) * qk + nope, c + b * rope_dim / 2, s + b * rope_dim / 2, rope_dim, dst + r);
    }
  const auto out_latent = latent_attention(q_abs, cache, read_slots, lengths, r, scale);  // [B, n_h, r]
  const auto out = small_matmul(out_latent.permute({1, 0, 2}), w_uv);  // [n_h, B, v]
  return small_matmul(out.permute({1, 0, 2}).reshape({B, -1}), o_proj);  // [B, H]
}

}  // namespace

namespace dsv2_cpu {

at::Tensor mla_decode(const at::Tensor& x, const std::optional<at::Tensor>& q_proj,
                      const std::optional<at::Tensor>& q_a_proj, const std::optional<at::Tensor>& q_a_norm,
                      const std::optional<at::Tensor>& q_b_proj, const at::Tensor& kv_a_proj,
                      const at::Tensor& kv_a_norm, const at::Tensor& w_uk_t, const at::Tensor& w_uv,
                      const at::Tensor& o_proj, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache,
                      const at::Tensor& write_slots, const at::Tensor& read_slots, const at::Tensor& lengths,
                      double eps, double scale, const std::optional<at::Tensor>& input_norm) {
  if (input_norm)  // x is the residual stream h: h + attention(norm(h))
    return residual_of(x.contiguous(), *input_norm, eps, [&](const at::Tensor& normed) {
      return mla_decode(normed, q_proj, q_a_proj, q_a_norm, q_b_proj, kv_a_proj, kv_a_norm, w_uk_t, w_uv, o_proj, cos,
                        sin, cache, write_slots, read_slots, lengths, eps, scale, std::nullopt);
    });
  TORCH_CHECK(x.dim() == 2 && cache.dim() == 2 && w_uk_t.dim() == 3 && w_uv.dim() == 3,
              "mla_decode: x [B, H], cache [slots, r + d_R], w_uk_t [n_h, r, d], w_uv [n_h, v, r]");
  TORCH_CHECK(q_proj.has_value() != (q_a_proj.has_value() && q_a_norm.has_value() && q_b_proj.has_value()),
              "mla_decode: either q_proj or q_a_proj, q_a_norm and q_b_proj");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0),
              "mla_decode: cos and sin [B, d_R/2] contiguous float32");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "mla_decode: bfloat16 or float32");
  for (const auto* t : {&kv_a_norm, &cache})
    TORCH_CHECK(t->scalar_type() == dtype && t->device().is_cpu(), "mla_decode: tensors of x's dtype on the CPU");
  const auto xs = x.contiguous();
  at::Tensor q;
  if (q_proj) {
    q = small_matmul(xs, *q_proj);  // [B, n_h·(d + d_R)]
  } else {
    auto q_a = small_matmul(xs, *q_a_proj);  // [B, q_lora_rank]
    rms_norm_(q_a, *q_a_norm, eps);
    q = small_matmul(q_a, *q_b_proj);
  }
  auto kv = small_matmul(xs, kv_a_proj);  // [B, r + d_R]
  const auto slots = write_slots.to(at::kLong).contiguous();
  const auto norm = kv_a_norm.contiguous();
  if (dtype == at::kBFloat16)
    return mla_decode_impl<bf16>(xs, q, kv, norm, w_uk_t, w_uv, o_proj, cos, sin, cache, slots, read_slots, lengths,
                                 eps, scale);
  return mla_decode_impl<float>(xs, q, kv, norm, w_uk_t, w_uv, o_proj, cos, sin, cache, slots, read_slots, lengths,
                                eps, scale);
}

}  // namespace dsv2_cpu

TORCH_LIBRARY_FRAGMENT(dsv2_cpu, m) {
  m.def(
      "mla_decode(Tensor x, Tensor? q_proj, Tensor? q_a_proj, Tensor? q_a_norm, Tensor? q_b_proj, Tensor kv_a_proj, "
      "Tensor kv_a_norm, Tensor w_uk_t, Tensor w_uv, Tensor o_proj, Tensor cos, Tensor sin, Tensor(a!) cache, "
      "Tensor write_slots, Tensor read_slots, Tensor lengths, float eps, float scale, Tensor? input_norm=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv2_cpu, CPU, m) { m.impl("mla_decode", &dsv2_cpu::mla_decode); }
