// What the kernels share: the tile configuration, the permission Linux asks for, per-thread work buffers, bf16
// rounding, DeepSeek-V2's RMSNorm and a decoder layer's residual step, register tiles of dot products, and the
// kernels that other kernels call.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <functional>
#include <vector>

namespace dsv2_amx {

using bf16 = c10::BFloat16;
constexpr int64_t TILE = 16;   // rows of a tile (weight rows, keys, heads), tokens of a group
constexpr int64_t KSTEP = 32;  // bf16 values of K per tile product

// Every tile used is 16 rows of 64 bytes: float32 [16][16] accumulators, bf16 [16][32] operands.
inline void configure_tiles(int tiles) {
  struct {
    uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } config;
  for (int t = 0; t < tiles; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

inline bool amx_permitted() {  // Linux hands out the AMX register state per process, on request
  constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  static const bool ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return ok;
}

// A buffer of at least n values for this thread, kept for its next calls: no allocation, page faults or zeroing per
// call (its contents are whatever the last call left). Tag tells buffers of one type apart: each kernel uses its own
// tags (latent_attention 0-9, routed_experts 10-19), one per buffer a call holds at once.
template <typename T, int Tag>
inline T* scratch(size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

inline float round_bf16(float v) { return static_cast<float>(static_cast<bf16>(v)); }

// DeepSeek-V2's RMSNorm over each row of x [B, n] in place: float32 statistics, cast to the dtype, times the weight.
template <typename T>
void rms_norm_rows(T* x, int64_t rows, int64_t n, int64_t stride, const T* weight, float eps) {
  for (int64_t b = 0; b < rows; ++b) {
    T* row = x + b * stride;
    float squares = 0.0f;
    for (int64_t i = 0; i < n; ++i) squares += static_cast<float>(row[i]) * static_cast<float>(row[i]);
    const float inv = 1.0f / std::sqrt(squares / n + eps);
    for (int64_t i = 0; i < n; ++i)
      row[i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(static_cast<T>(row[i] * inv)));
  }
}

// RMSNorm in place over the rows of x [B, n] (contiguous), weight [n] of x's dtype (bf16 or float32).
inline void rms_norm_(at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.scalar_type() == x.scalar_type() && weight.numel() == x.size(-1),
              "rms_norm: contiguous rows and a weight of their size and dtype");
  const auto w = weight.contiguous();
  const int64_t n = x.size(-1), rows = x.numel() / n;
  if (x.scalar_type() == at::kBFloat16)
    rms_norm_rows(x.data_ptr<bf16>(), rows, n, n, w.data_ptr<bf16>(), static_cast<float>(eps));
  else
    rms_norm_rows(x.data_ptr<float>(), rows, n, n, w.data_ptr<float>(), static_cast<float>(eps));
}

// A decoder layer's residual step for rows of h [B, H]: h + f(norm(h)), the sum rounded to h's dtype.
inline at::Tensor residual_of(const at::Tensor& h, const at::Tensor& norm_weight, double eps,
                              const std::function<at::Tensor(const at::Tensor&)>& f) {
  auto normed = h.contiguous().clone();
  rms_norm_(normed, norm_weight, eps);
  return f(normed).add_(h);
}

// Register tiles of dot products against weights stored [N, K] (small_matmul; routed_experts in float32).
// The element types: how many values one 512-bit register holds and how a step multiplies them into float32.
struct Bf16Step {
  using T = bf16;
  static constexpr int64_t values = 32;
  static __m512 fma(const T* w, const T* x, __m512 acc) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(x));
  }
};

struct Fp32Step {
  using T = float;
  static constexpr int64_t values = 16;
  static __m512 fma(const T* w, const T* x, __m512 acc) {
    return _mm512_fmadd_ps(_mm512_loadu_ps(w), _mm512_loadu_ps(x), acc);
  }
};

// out[m·ldo + r] = Σ_k w[r·K + k] · x[m][k] for R weight rows and M input rows; the R rows after them are prefetched.
template <typename Step, int R, int M>
inline void tile(const typename Step::T* w, const typename Step::T* const* x, int64_t K, typename Step::T* out,
                 int64_t ldo) {
  __m512 acc[R][M];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += Step::values) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * K + k), _MM_HINT_T0);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) acc[r][m] = Step::fma(w + r * K + k, x[m] + k, acc[r][m]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) out[m * ldo + r] = static_cast<typename Step::T>(_mm512_reduce_add_ps(acc[r][m]));
}

template <typename Step, int R>
inline void tile_any(const typename Step::T* w, const typename Step::T* const* x, int64_t m, int64_t K,
                     typename Step::T* out, int64_t ldo) {
  switch (m) {
    case 1: tile<Step, R, 1>(w, x, K, out, ldo); break;
    case 2: tile<Step, R, 2>(w, x, K, out, ldo); break;
    case 3: tile<Step, R, 3>(w, x, K, out, ldo); break;
    default: tile<Step, R, 4>(w, x, K, out, ldo); break;
  }
}

// The kernels other kernels call (small_matmul.cpp, latent_attention.cpp, routed_experts.cpp).
at::Tensor small_matmul(const at::Tensor& x, const at::Tensor& weight);
at::Tensor latent_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& slots,
                            const at::Tensor& lengths, int64_t value_dim, double scale);
at::Tensor routed_experts(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& weights,
                          const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down);

}  // namespace dsv2_amx
