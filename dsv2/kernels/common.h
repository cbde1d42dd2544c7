// What the kernels share: the AMX tile configuration, the permission Linux asks for, per-thread work buffers, bf16
// rounding, DeepSeek-V2's RMSNorm and a decoder layer's residual step, register tiles of dot products, and the
// kernels that other kernels call.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <vector>

namespace dsv2_cpu {

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

inline bool amx_permitted() {  // Linux hands out the AMX register state per process, on request (refused without AMX)
  constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  static const bool ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return ok;
}

// Whether the bf16 paths may take the AMX tiles: on unless `use_amx(false)` switched them off (so that the AVX-512
// paths are tested on AMX machines too). One flag for the library (an inline function's static is shared).
inline std::atomic<bool>& amx_wanted() {
  static std::atomic<bool> wanted{true};
  return wanted;
}

// The bf16 paths run on the AMX tiles where this holds, on AVX-512 registers elsewhere.
inline bool amx_usable() { return amx_wanted().load(std::memory_order_relaxed) && amx_permitted(); }

// Whether parallel_tasks balances its ranges (`balance_tasks(false)`: static ranges, as at::parallel_for).
inline std::atomic<bool>& tasks_balanced() {
  static std::atomic<bool> on{true};
  return on;
}

// fn(begin, end) over the tasks [0, n) on the intra-op threads: thread t takes the t-th of equal contiguous ranges,
// `grain` tasks at a time, front to back (the stream the hardware prefetcher follows), then helps finish the ranges
// after it. A thread slowed down (vCPUs share their cores with other guests) leaves the rest of its range to the
// others instead of making them wait for it at the end. At most `grain` tasks run on the calling thread alone.
template <typename F>
void parallel_tasks(int64_t n, int64_t grain, const F& fn) {
  grain = std::max<int64_t>(grain, 1);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (threads <= 1 || at::in_parallel_region()) {
    if (n > 0) fn(0, n);
    return;
  }
  if (!tasks_balanced().load(std::memory_order_relaxed)) {
    at::parallel_for(0, n, (n + threads - 1) / threads, fn);
    return;
  }
  struct alignas(64) Next {  // a range's next task, one cache line each
    std::atomic<int64_t> task;
  };
  std::vector<Next> next(threads);
  for (int64_t t = 0; t < threads; ++t) next[t].task.store(t * n / threads, std::memory_order_relaxed);
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t me = first; me < last; ++me)
      for (int64_t k = 0; k < threads; ++k) {
        const int64_t range = (me + k) % threads, end = (range + 1) * n / threads;
        for (int64_t begin; (begin = next[range].task.fetch_add(grain, std::memory_order_relaxed)) < end;)
          fn(begin, std::min(begin + grain, end));
      }
  });
}

// A buffer of at least n values for this thread, kept for its next calls: no allocation, page faults or zeroing per
// call (its contents are whatever the last call left). Tag tells buffers of one type apart: each kernel uses its own
// tags (latent_attention 0-9, routed_experts 10-19, small_matmul 20-29, mla_out 30-39, moe_out 40-49,
// add_residual 50-59, decode_layers 60-69), one per buffer a call holds at once.
template <typename T, int Tag>
inline T* scratch(size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

inline float round_bf16(float v) { return static_cast<float>(static_cast<bf16>(v)); }

// 16 bf16 values as float32 (exact: a bf16 is the top half of a float32).
inline __m512 widen_bf16(__m256bh v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)v), 16));
}

// 16 values of x's dtype from p as float32 (exact).
inline __m512 load_f32(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_f32(const bf16* p) {
  return widen_bf16((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

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

// A weight's values for a raw-pointer kernel: contiguous, on the CPU, of T and of `numel` values (else an error that
// starts with `what`).
template <typename T>
const T* weight_data(const at::Tensor& t, int64_t numel, const char* what) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu() && t.scalar_type() == c10::CppTypeToScalarType<T>::value &&
                  t.numel() == numel,
              what, ": contiguous on the CPU, in x's dtype, of ", numel, " values; got ", t.sizes(), " ",
              t.scalar_type());
  return t.data_ptr<T>();
}

// A decoder layer's residual step for rows of h [B, H] in place: h + f(norm(h)), the sum rounded to h's dtype.
// f(normed, out) writes its [B, H] result to out.
template <typename T, typename F>
void add_residual(T* h, int64_t B, int64_t H, const T* norm_weight, float eps, const F& f) {
  T* normed = scratch<T, 50>(B * H);
  T* out = scratch<T, 51>(B * H);
  std::copy(h, h + B * H, normed);
  rms_norm_rows(normed, B, H, H, norm_weight, eps);
  f(static_cast<const T*>(normed), out);
  for (int64_t i = 0; i < B * H; ++i) h[i] = static_cast<T>(static_cast<float>(out[i]) + static_cast<float>(h[i]));
}

// Register tiles of dot products against weights stored [N, K] (small_matmul; routed_experts in float32).
// The element types: how many values one 512-bit register holds and how a step multiplies them into float32.
struct Bf16Step {
  using T = bf16;
  static constexpr int64_t values = 32;
  static __m512 load(const T* p) { return _mm512_castsi512_ps(_mm512_loadu_si512(p)); }
  static __m512 load_nt(const T* p) { return _mm512_castsi512_ps(_mm512_stream_load_si512(const_cast<T*>(p))); }
  static __m512 fma(__m512 w, __m512 x, __m512 acc) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x); }
};

struct Fp32Step {
  using T = float;
  static constexpr int64_t values = 16;
  static __m512 load(const T* p) { return _mm512_loadu_ps(p); }
  static __m512 load_nt(const T* p) { return _mm512_castsi512_ps(_mm512_stream_load_si512(const_cast<T*>(p))); }
  static __m512 fma(__m512 w, __m512 x, __m512 acc) { return _mm512_fmadd_ps(w, x, acc); }
};

// Lane i of the result = the sum of v[i]'s 16 lanes, for i < n ≤ 16 (the other lanes are 0): four rounds of
// shuffles and adds over all the vectors at once, instead of a reduction per vector.
template <int n>
inline __m512 sum_each(const __m512* v) {
  static_assert(n >= 1 && n <= 16, "sum_each: 1 to 16 vectors");
  auto at = [&](int i) { return i < n ? v[i] : _mm512_setzero_ps(); };
  __m512 quads[4];  // quads[q]: 128-bit block b holds block b's sums of v[4q .. 4q + 3]
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    if (4 * q >= n) {
      quads[q] = _mm512_setzero_ps();
      continue;
    }
    const __m512 a = at(4 * q), b = at(4 * q + 1), c = at(4 * q + 2), d = at(4 * q + 3);
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a0+a2 b0+b2 a1+a3 b1+b3
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
    quads[q] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));  // Σa Σb Σc Σd per block
  }
  // add the four blocks: pairs of blocks, then pairs of those
  const __m512 h0 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                  _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 h1 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                  _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(h0, h1, 0x88), _mm512_shuffle_f32x4(h0, h1, 0xDD));
}

// out[m·ldo + r] = Σ_k w[r·K + k] · x[m][k] for R weight rows and M input rows; the R rows after them are prefetched.
template <typename Step, int R, int M>
inline void tile(const typename Step::T* w, const typename Step::T* const* x, int64_t K, typename Step::T* out,
                 int64_t ldo) {
  static_assert(R * M <= 16, "tile: at most 16 accumulators");
  __m512 acc[R * M];  // acc[m·R + r]
#pragma GCC unroll 16
  for (int i = 0; i < R * M; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += Step::values) {
    // an operand that several products use is loaded once per step: the empty asm keeps GCC from folding its load
    // into every one of them (the loads, not the FMAs, would then bound the loop); one used once stays folded (fewer
    // instructions in flight per load: more loads in flight, which streaming a weight for one row needs)
    __m512 wv[R], xv[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      xv[m] = Step::load(x[m] + k);
      if constexpr (R > 1) __asm__("" : "+v"(xv[m]));
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * K + k), _MM_HINT_T0);
      wv[r] = Step::load(w + r * K + k);
      if constexpr (M > 1) __asm__("" : "+v"(wv[r]));
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m * R + r] = Step::fma(wv[r], xv[m], acc[m * R + r]);
  }
  alignas(64) float sums[16];
  _mm512_store_ps(sums, sum_each<R * M>(acc));
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) out[m * ldo + r] = static_cast<typename Step::T>(sums[m * R + r]);
}

constexpr int64_t TILE_INPUTS = 8;  // input rows a call of tile_any takes at most

// R weight rows against M input rows as tiles of ≤ 16 accumulators: one R × M tile, or pairs of rows as 2 × M tiles.
template <typename Step, int R, int M>
inline void tile_split(const typename Step::T* w, const typename Step::T* const* x, int64_t K, typename Step::T* out,
                       int64_t ldo) {
  if constexpr (R * M <= 16) {
    tile<Step, R, M>(w, x, K, out, ldo);
  } else {
    static_assert(R % 2 == 0 && 2 * M <= 16, "tile_split: rows in pairs, at most 8 inputs");
#pragma GCC unroll 4
    for (int r = 0; r < R; r += 2) tile<Step, 2, M>(w + r * K, x, K, out + r, ldo);
  }
}

// Whether one input row takes the weight's rows one after another (one sequential stream per thread) rather than R at
// a time (R streams): on AMD (Zen 4, 2 cores) a bf16 weight streamed for one row at 20-30 GB/s that way against 13-20
// GB/s in 4-row tiles (float32 1.05-1.4×); Intel machines keep the tiles they were tuned with. Such a stream is left
// to the hardware prefetcher: without prefetching the next row as well, batch-1 decode steps were 1.05-1.10× faster
// in bf16 and 1.04× in float32 there, a weight streamed 5-16% faster (same-process A/B). See rows_in_turn.
inline bool one_row_streams() {
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
}

// Lanes [0, n) of v rounded to T and stored to out[0, n): bf16 rounds to nearest even as c10::BFloat16 does (NaN to
// its quiet NaN; input denormals kept, which VCVTNEPS2BF16 would flush).
inline void store_lanes(__m512 v, int n, float* out) { _mm512_mask_storeu_ps(out, (1u << n) - 1, v); }
inline void store_lanes(__m512 v, int n, bf16* out) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(out, (1u << n) - 1, _mm512_cvtepi32_epi16(rounded));
}

// R weight rows against one input row, the rows read one after another (one sequential stream), each row's sum in
// its own register: the R sums are reduced together (sum_each) and stored as one vector, the same sums as one row at a
// time, bit for bit. A reduction and a scalar store per row had been most of the work of short rows: in cache, bf16
// on 2 threads, 16 heads' [256, 64] W_UK 27 → 58 GB/s (16-row blocks), [64, 256] W_UV 51 → 80, a [1024, 352] expert
// 63 → 84; batch-1 decode of a 14M-active-parameter model (weights in cache) 1.12× in bf16; the benchmark's model,
// which streams its weights from memory, 1.00-1.02×.
// The weight is read with non-temporal loads (VMOVNTDQA) where it is 64-byte aligned (its rows then are too: K is a
// multiple of a register's 64 bytes): on AMD's Zen 4 the benchmark's batch-1 decoding step, whose weights stream from
// memory once per step, ran 1.17× faster in bf16 (6.15 → 5.25 ms) and 1.20× in float32 in the machine's fast memory
// mode, 1.02× in its slow one (same-process A/B, the same tokens); the same loads in the multi-row tiles (without or
// with a non-temporal prefetch in place of theirs) made 8-row steps 0.74× / 0.97× as fast.
template <typename Step, int R, bool NonTemporal>
inline void rows_in_turn_loads(const typename Step::T* w, const typename Step::T* x, int64_t K,
                               typename Step::T* out) {
  __m512 acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += Step::values) {
      const __m512 wv = NonTemporal ? Step::load_nt(w + r * K + k) : Step::load(w + r * K + k);
      acc[r] = Step::fma(wv, Step::load(x + k), acc[r]);
    }
  }
  store_lanes(sum_each<R>(acc), R, out);
}

template <typename Step, int R>
inline void rows_in_turn(const typename Step::T* w, const typename Step::T* x, int64_t K, typename Step::T* out) {
  if ((reinterpret_cast<uintptr_t>(w) & 63) == 0 && K * sizeof(typename Step::T) % 64 == 0)  // every row aligned
    rows_in_turn_loads<Step, R, true>(w, x, K, out);
  else
    rows_in_turn_loads<Step, R, false>(w, x, K, out);
}

// R weight rows against m ∈ [1, TILE_INPUTS] input rows.
template <typename Step, int R>
inline void tile_any(const typename Step::T* w, const typename Step::T* const* x, int64_t m, int64_t K,
                     typename Step::T* out, int64_t ldo) {
  if (m == 1 && one_row_streams()) {
    rows_in_turn<Step, R>(w, x[0], K, out);
    return;
  }
  switch (m) {
    case 1: tile_split<Step, R, 1>(w, x, K, out, ldo); break;
    case 2: tile_split<Step, R, 2>(w, x, K, out, ldo); break;
    case 3: tile_split<Step, R, 3>(w, x, K, out, ldo); break;
    case 4: tile_split<Step, R, 4>(w, x, K, out, ldo); break;
    case 5: tile_split<Step, R, 5>(w, x, K, out, ldo); break;
    case 6: tile_split<Step, R, 6>(w, x, K, out, ldo); break;
    case 7: tile_split<Step, R, 7>(w, x, K, out, ldo); break;
    default: tile_split<Step, R, 8>(w, x, K, out, ldo); break;
  }
}

// The rows x [N, H] through f(x, out) (a half of a decoder layer): out [N, H]; or, given the layer's norm,
// x + f(norm(x)).
template <typename T, typename F>
at::Tensor rows_through(const at::Tensor& x_in, const std::optional<at::Tensor>& input_norm, double eps, const F& f) {
  const auto x = x_in.contiguous();
  const int64_t N = x.size(0), H = x.size(1);
  if (!input_norm) {
    auto out = at::empty_like(x);
    f(x.data_ptr<T>(), out.data_ptr<T>());
    return out;
  }
  const auto norm = input_norm->contiguous();
  auto h = x.clone();
  add_residual(h.data_ptr<T>(), N, H, weight_data<T>(norm, H, "input_norm"), static_cast<float>(eps), f);
  return h;
}

// t->contiguous() where t is given.
inline std::optional<at::Tensor> contiguous_if_given(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// A product of a few rows with a weight as stored, on raw pointers: out[g][m][n] = Σ_k x[g·x_g + m·x_m + k] ·
// w[(g·N + n)·K + k], for g < G, m < M, n < N; out contiguous [G, M, N], w contiguous [G, N, K].
template <typename T>
struct Product {
  const T* x;
  int64_t G, M, K, x_g, x_m;
  const T* w;
  int64_t N;
  T* out;
};

// The kernels other kernels call (small_matmul.cpp, latent_attention.cpp, routed_experts.cpp, mla_decode.cpp,
// moe_decode.cpp), each on tensors (an operator's checks and conversions) and, for the decoding step's own calls, on
// raw pointers to contiguous data (no torch operation: ~1 µs each, ~80 per layer of a decoding step otherwise).
// 1-4 products of the same number of rows (M) in one parallel region (bf16 and float32; K a multiple of
// K_MULTIPLE<T>).
template <typename T>
void small_matmul(std::initializer_list<Product<T>> products);
template <typename T>
void small_matmul(const Product<T>& product) {
  small_matmul<T>({product});
}

// What a product's K must be a multiple of: one register of values.
template <typename T>
constexpr int64_t K_MULTIPLE = std::is_same_v<T, bf16> ? 32 : 16;
at::Tensor small_matmul(const at::Tensor& x, const at::Tensor& weight);
// MLA's absorbed attention of B sequences' queries q [B, heads, D] over one layer's cache rows [num_slots, D] (row
// stride row_stride): sequence b attends to the rows slots[b·S + s], s < lengths[b]; → out [B, heads, r].
template <typename T>
struct Attention {
  const T* q;
  int64_t B, heads, D;
  const T* cache;
  int64_t num_slots, row_stride;
  const int64_t* slots;
  int64_t S;
  const int64_t* lengths;
  int64_t r;
  float scale;
  T* out;
};

template <typename T>
void latent_attention(const Attention<T>& a);  // D a multiple of 32, r of 16
at::Tensor latent_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& slots,
                            const at::Tensor& lengths, int64_t value_dim, double scale);
// A step's routed experts for N tokens x [N, H]: token n goes to the experts ids[n·k + slot] (others' ids: skipped)
// with the combine weights weights[n·k + slot]; gate and up [E, I, H], down [E, H, I]; → out [N, H] float32 sums.
// The shared experts of the same tokens (a SwiGLU: gate and up [shared_I, H], down [H, shared_I]; none where
// shared_gate is null) may come along: → shared_out [N, H], what moe_decode.cpp's swiglu computes, bit for bit.
template <typename T>
struct RoutedExperts {
  const T* x;
  int64_t N, H;
  const int64_t* ids;
  const float* weights;
  int64_t k;
  const T *gate, *up, *down;
  int64_t E, I;
  float* out;
  const T *shared_gate = nullptr, *shared_up = nullptr, *shared_down = nullptr;
  int64_t shared_I = 0;
  T* shared_out = nullptr;
};

// → whether it computed the shared experts too: in the routed experts' two parallel regions where those run on
// register tiles (no AMX); otherwise the caller runs them.
template <typename T>
bool routed_experts(const RoutedExperts<T>& p);  // H and I multiples of 32, shared_I of 16
at::Tensor routed_experts(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& weights,
                          const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down);
// What every layer of a decoding step shares: each row's RoPE cos/sin [B, d_R/2] (float32), write slot [B], read
// slots [B, S] and length [B]; the norms' eps and the attention's softmax scale.
struct DecodeRows {
  const float *cos, *sin;
  const int64_t* write_slots;
  const int64_t* read_slots;
  int64_t S;
  const int64_t* lengths;
  float eps, scale;
};

// A decoding step's DecodeRows from its tensors for B rows, checked (errors start with `what`), with the slots and
// lengths held as int64.
struct StepRows {
  at::Tensor writes, reads, lengths;
  DecodeRows rows;

  StepRows(const char* what, int64_t B, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& write_slots,
           const at::Tensor& read_slots, const at::Tensor& lengths_in, double eps, double scale) {
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                    sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == B,
                what, ": cos and sin [B, d_R/2] contiguous float32");
    TORCH_CHECK(read_slots.dim() == 2 && read_slots.size(0) == B && lengths_in.dim() == 1 &&
                    lengths_in.size(0) == B && write_slots.numel() == B,
                what, ": write slots [B], read slots [B, S] and lengths [B]");
    writes = write_slots.to(at::kLong).contiguous(), reads = read_slots.to(at::kLong).contiguous();
    lengths = lengths_in.to(at::kLong).contiguous();
    rows = {cos.data_ptr<float>(), sin.data_ptr<float>(), writes.data_ptr<int64_t>(), reads.data_ptr<int64_t>(),
            reads.size(1), lengths.data_ptr<int64_t>(), static_cast<float>(eps), static_cast<float>(scale)};
  }
};

// A decoding step's DecodeRows from tables, for B rows: each row's position (positions [B] or [B, 1]) picks its cos/sin
// from the [P, d_R/2] float32 tables (row p: position p) and its write slot from its read slots [B, S] (entry s: the
// slot of position s); its length is position + 1. Checked (errors start with `what`), the rows held here.
struct TableRows {
  std::vector<float> cos, sin;
  std::vector<int64_t> writes, lengths;
  at::Tensor reads;
  DecodeRows rows;

  TableRows(const char* what, int64_t B, const at::Tensor& positions, const at::Tensor& cos_table,
            const at::Tensor& sin_table, const at::Tensor& read_slots, double eps, double scale) {
    TORCH_CHECK(cos_table.scalar_type() == at::kFloat && sin_table.scalar_type() == at::kFloat &&
                    cos_table.is_contiguous() && sin_table.is_contiguous() && cos_table.dim() == 2 &&
                    cos_table.sizes() == sin_table.sizes(),
                what, ": RoPE cos and sin tables [positions, d_R/2] contiguous float32");
    TORCH_CHECK(positions.numel() == B && (positions.dim() == 1 || (positions.dim() == 2 && positions.size(1) == 1)),
                what, ": positions [B] or [B, 1] for the step's ", B, " rows; got ", positions.sizes());
    TORCH_CHECK(read_slots.dim() == 2 && read_slots.size(0) == B, what, ": read slots [B, S]; got ",
                read_slots.sizes());
    const auto at = positions.to(at::kLong).contiguous();
    reads = read_slots.to(at::kLong).contiguous();
    const int64_t half = cos_table.size(1), P = cos_table.size(0), S = reads.size(1);
    const int64_t* pos = at.data_ptr<int64_t>();
    const int64_t* slots = reads.data_ptr<int64_t>();
    cos.resize(B * half), sin.resize(B * half), writes.resize(B), lengths.resize(B);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(pos[b] >= 0 && pos[b] < P && pos[b] < S, what, ": row ", b, "'s position ", pos[b],
                  " is outside the RoPE tables (", P, " positions) or its read slots (", S, ")");
      std::copy_n(cos_table.data_ptr<float>() + pos[b] * half, half, cos.data() + b * half);
      std::copy_n(sin_table.data_ptr<float>() + pos[b] * half, half, sin.data() + b * half);
      writes[b] = slots[b * S + pos[b]], lengths[b] = pos[b] + 1;
    }
    rows = {cos.data(), sin.data(), writes.data(), slots, S, lengths.data(), static_cast<float>(eps),
            static_cast<float>(scale)};
  }
};

// One layer's MLA weights (contiguous, x's dtype): q_proj, or q_a_proj / q_a_norm / q_b_proj (q_rank rows); and its
// cache rows [num_slots, r + d_R] (row stride row_stride).
template <typename T>
struct MlaLayer {
  const T *q_proj, *q_a_proj, *q_a_norm, *q_b_proj;  // the ones a layer lacks: nullptr
  int64_t q_rank;
  const T *kv_a_proj, *kv_a_norm, *w_uk_t, *w_uv, *o_proj;
  int64_t hidden, heads, r, nope, rope_dim, v;
  T* cache;
  int64_t num_slots, row_stride;
};

// The layer from its tensors, the sizes checked against each other (mla_decode.cpp).
template <typename T>
MlaLayer<T> mla_layer(const std::optional<at::Tensor>& q_proj, const std::optional<at::Tensor>& q_a_proj,
                      const std::optional<at::Tensor>& q_a_norm, const std::optional<at::Tensor>& q_b_proj,
                      const at::Tensor& kv_a_proj, const at::Tensor& kv_a_norm, const at::Tensor& w_uk_t,
                      const at::Tensor& w_uv, const at::Tensor& o_proj, const at::Tensor& cache);

// The attention half of a decoding step for rows x [B, H] (normed): out [B, H] = W_O · attention(x); writes each
// row's latent to the cache.
template <typename T>
void mla_out(const MlaLayer<T>& L, const DecodeRows& rows, const T* x, int64_t B, T* out);

at::Tensor mla_decode(const at::Tensor& x, const std::optional<at::Tensor>& q_proj,
                      const std::optional<at::Tensor>& q_a_proj, const std::optional<at::Tensor>& q_a_norm,
                      const std::optional<at::Tensor>& q_b_proj, const at::Tensor& kv_a_proj,
                      const at::Tensor& kv_a_norm, const at::Tensor& w_uk_t, const at::Tensor& w_uv,
                      const at::Tensor& o_proj, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache,
                      const at::Tensor& write_slots, const at::Tensor& read_slots, const at::Tensor& lengths,
                      double eps, double scale, const std::optional<at::Tensor>& input_norm);
// A MoE layer's routing settings (MoEGate's).
struct Routing {
  int64_t top_k;
  bool group_limited;
  int64_t n_group, topk_group;
  bool norm_topk_prob;
  double scaling;  // routed_scaling_factor
};

// A SwiGLU MLP's weights (contiguous, x's dtype): gate and up [I, H], down [H, I].
template <typename T>
struct MlpLayer {
  const T *gate, *up, *down;
  int64_t hidden, inter;
};

// One MoE layer's weights: the gate's [E, H] (bf16 or float32 whatever x's dtype), the routed experts' (gate and up
// [E, I, H], down [E, H, I]) and the shared experts' (nullptr where the layer has none), contiguous in x's dtype.
template <typename T>
struct MoeLayer {
  const void* gate;
  bool gate_bf16;
  int64_t hidden, experts;
  Routing routing;
  const T *expert_gate, *expert_up, *expert_down;
  int64_t expert_inter;
  const T *shared_gate, *shared_up, *shared_down;
  int64_t shared_inter;
};

// The layers from their tensors, the sizes checked against each other (moe_decode.cpp); what: the error's start.
template <typename T>
MlpLayer<T> mlp_layer(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down, const char* what);
template <typename T>
MoeLayer<T> moe_layer(const at::Tensor& gate_weight, const Routing& routing, const at::Tensor& expert_gate,
                      const at::Tensor& expert_up, const at::Tensor& expert_down,
                      const std::optional<at::Tensor>& shared_gate, const std::optional<at::Tensor>& shared_up,
                      const std::optional<at::Tensor>& shared_down);

// The MoE (or dense MLP) half of a decoding step for rows x [N, H] (normed): out [N, H].
template <typename T>
void moe_out(const MoeLayer<T>& L, const T* x, int64_t N, T* out);
template <typename T>
void mlp_out(const MlpLayer<T>& L, const T* x, int64_t N, T* out);

at::Tensor moe_decode(const at::Tensor& x, const at::Tensor& gate_weight, int64_t top_k, bool group_limited,
                      int64_t n_group, int64_t topk_group, bool norm_topk_prob, double routed_scaling_factor,
                      const at::Tensor& expert_gate, const at::Tensor& expert_up, const at::Tensor& expert_down,
                      const std::optional<at::Tensor>& shared_gate, const std::optional<at::Tensor>& shared_up,
                      const std::optional<at::Tensor>& shared_down, const std::optional<at::Tensor>& input_norm,
                      double eps);
at::Tensor mlp_decode(const at::Tensor& h, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down,
                      const at::Tensor& input_norm, double eps);

}  // namespace dsv2_cpu
