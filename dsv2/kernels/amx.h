// What the AMX kernels share: the tile configuration, the permission Linux asks for, bf16 rounding.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

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

// The kernels other kernels call (small_matmul.cpp, latent_attention.cpp, routed_experts.cpp).
at::Tensor small_matmul(const at::Tensor& x, const at::Tensor& weight);
at::Tensor latent_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& slots,
                            const at::Tensor& lengths, int64_t value_dim, double scale);
at::Tensor routed_experts(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& weights,
                          const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down);

}  // namespace dsv2_amx
