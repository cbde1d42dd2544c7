// Products of a few rows with a large weight, for decoding: out[g] = x[g] · weight[g]ᵀ, x [G, M, K] with M ≲ 16 rows,
// weight [G, N, K] as stored (MLA's per-head W_UK / W_UV, G = heads); or a linear layer's x [..., K] · [N, K]ᵀ.
//
// At a handful of rows the product only has to stream the weight once at the memory's rate. torch's paths do not:
// its bf16 gemv (`torch.mv`) read a 1,536 × 1,024 weight at 13-25 GB/s here, oneDNN's matmul at 8 rows no faster,
// and a batched matmul of 16 heads × one row ran at ~4 GB/s. This kernel gives each thread a contiguous run of
// 4-row blocks of the weight (so the hardware prefetcher streams it), keeps up to 16 float32 accumulators in registers
// (4 rows × ≤ 4 input rows, or 2 × 5-8: up to 8 input rows per pass over a block), and prefetches the next block; one
// input row on AMD takes 16-row blocks, each row read in turn (rows_in_turn, common.h).
// bf16 multiplies pairs with AVX512-BF16 (VDPBF16PS: exact products, float32 sums), float32 with FMAs; the result is
// rounded to the input's dtype once.
// bf16 with 5-16 rows runs on the AMX tiles instead (`small_matmul_amx`), where the register tiles turn
// compute-bound: 1.1-2.5× them, 1.1-1.7× oneDNN's prepacked path (model shapes, weights out of cache).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>

#include "common.h"

namespace {

using namespace dsv2_cpu;

constexpr int64_t ROWS = 4;  // weight rows per register tile
constexpr int64_t COLS = TILE_INPUTS;  // input rows per register tile

// The products' weight rows (each product's from first_row on; the rows before: another path's), all in one parallel
// region: independent products of the same rows (a layer's q and kv_a projections, an MLP's gate and up) stream
// their weights one after another without the threads meeting in between.
template <typename Step>
void small_matmul_impl(const Product<typename Step::T>* products, int64_t count, int64_t first_row = 0) {
  using T = typename Step::T;
  constexpr int64_t MAX_PRODUCTS = 4;
  TORCH_CHECK(count >= 1 && count <= MAX_PRODUCTS, "small_matmul: 1 to 4 products at once");
  // one input row where rows stream one at a time (AMD): blocks of 16 rows, each row's sum in its own register
  // (rows_in_turn); otherwise 4-row register tiles
  const bool in_turn = products[0].M == 1 && one_row_streams();
  const int64_t block_rows = in_turn ? TILE : ROWS;
  int64_t first_task[MAX_PRODUCTS + 1] = {0}, blocks[MAX_PRODUCTS], K_max = 0;
  for (int64_t i = 0; i < count; ++i) {
    const auto& p = products[i];
    TORCH_CHECK(p.M == products[0].M, "small_matmul: products of the same number of rows");
    blocks[i] = (p.N - first_row + block_rows - 1) / block_rows;  // blocks per group; the last may be short
    first_task[i + 1] = first_task[i] + p.G * blocks[i];
    K_max = std::max(K_max, p.K);
  }
  // grain: ~64 KB of weight per task at least, so small products stay on one thread
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (block_rows * K_max * sizeof(T)));
  parallel_tasks(first_task[count], grain, [&](int64_t begin, int64_t end) {
    int64_t i = 0;
    for (int64_t task = begin; task < end; ++task) {
      while (task >= first_task[i + 1]) ++i;
      const auto& p = products[i];
      const int64_t M = p.M, K = p.K, N = p.N, local = task - first_task[i];
      const int64_t g = local / blocks[i], n0 = first_row + (local % blocks[i]) * block_rows;
      const int64_t rows = std::min(block_rows, N - n0);
      const T* w = p.w + (g * N + n0) * K;
      T* o = p.out + g * M * N + n0;
      if (in_turn) {
        if (rows == TILE)
          rows_in_turn<Step, TILE>(w, p.x + g * p.x_g, K, o);
        else
          for (int64_t r = 0; r < rows; ++r) rows_in_turn<Step, 1>(w + r * K, p.x + g * p.x_g, K, o + r);
        continue;
      }
      for (int64_t m0 = 0; m0 < M; m0 += COLS) {
        const int64_t cols = std::min(COLS, M - m0);
        const T* xr[COLS];
        for (int64_t m = 0; m < cols; ++m) xr[m] = p.x + g * p.x_g + (m0 + m) * p.x_m;
        if (rows == ROWS)
          tile_any<Step, ROWS>(w, xr, cols, K, o + m0 * N, N);
        else
          for (int64_t r = 0; r < rows; ++r) tile_any<Step, 1>(w + r * K, xr, cols, K, o + m0 * N + r, N);
      }
    }
  });
}

// bf16 with 5-16 input rows on the AMX tiles: each 16-row block of the weight is the A operand as stored, the input
// rows (pair-interleaved once: [K/2][16][2]) the B operand; a weight's last rows short of 16 take the register tiles.
constexpr int64_t AMX_MIN_ROWS = 5;

void small_matmul_amx(const Product<bf16>& p) {
  const int64_t G = p.G, M = p.M, K = p.K, N = p.N;
  const int64_t blocks = N / TILE;  // whole 16-row blocks per group
  const bf16* ws = p.w;
  bf16* os = p.out;
  uint32_t* xv = scratch<uint32_t, 20>(G * (K / 2) * TILE);  // [G][K/2][16 rows] bf16 pairs (absent rows: zeros)
  for (int64_t g = 0; g < G; ++g)
    for (int64_t m = 0; m < TILE; ++m) {
      const auto* src = reinterpret_cast<const uint32_t*>(p.x + g * p.x_g + m * p.x_m);
      uint32_t* dst = xv + g * (K / 2) * TILE + m;
      for (int64_t kk = 0; kk < K / 2; ++kk) dst[kk * TILE] = m < M ? src[kk] : 0;
    }
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (TILE * K * 2));  // ~64 KB of weight per task at least
  at::parallel_for(0, G * blocks, grain, [&](int64_t begin, int64_t end) {
    configure_tiles(3);  // 0: accumulator, 1: weight rows, 2: inputs
    alignas(64) float acc[TILE * TILE];  // [16 weight rows][16 inputs]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / blocks, n0 = (task % blocks) * TILE;
      const bf16* w = ws + (g * N + n0) * K;
      const uint32_t* b = xv + g * (K / 2) * TILE;
      const int64_t following = std::min(task + 1, G * blocks - 1);
      const bf16* next = ws + (following / blocks * N + following % blocks * TILE) * K;
      _tile_zero(0);
      for (int64_t k0 = 0; k0 < K; k0 += KSTEP) {
        for (int64_t r = 0; r < TILE; ++r)  // the same lines of the next block
          _mm_prefetch(reinterpret_cast<const char*>(next + r * K + k0), _MM_HINT_T0);
        _tile_loadd(1, w + k0, K * 2);
        _tile_loadd(2, b + (k0 / 2) * TILE, 64);
        _tile_dpbf16ps(0, 1, 2);
      }
      _tile_stored(0, acc, 64);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t r = 0; r < TILE; ++r) os[(g * M + m) * N + n0 + r] = static_cast<bf16>(acc[r * TILE + m]);
    }
    _tile_release();
  });
  if (blocks * TILE < N) small_matmul_impl<Bf16Step>(&p, 1, blocks * TILE);  // the rows after the last block
}

}  // namespace

namespace dsv2_cpu {

template <>
void small_matmul(std::initializer_list<Product<bf16>> products) {
  if (products.begin()->M >= AMX_MIN_ROWS && products.begin()->M <= TILE && amx_usable())
    for (const auto& p : products) small_matmul_amx(p);
  else
    small_matmul_impl<Bf16Step>(products.begin(), products.size());
}

template <>
void small_matmul(std::initializer_list<Product<float>> products) {
  small_matmul_impl<Fp32Step>(products.begin(), products.size());
}

at::Tensor small_matmul(const at::Tensor& x_in, const at::Tensor& weight_in) {
  // a linear layer's weight [N, K]: x [..., K] → [..., N], as one group of all its rows
  const bool linear = weight_in.dim() == 2;
  TORCH_CHECK(linear ? x_in.dim() >= 1 && weight_in.size(1) == x_in.size(-1)
                     : x_in.dim() == 3 && weight_in.dim() == 3 && weight_in.size(0) == x_in.size(0) &&
                           weight_in.size(2) == x_in.size(2),
              "small_matmul: x [..., K] and weight [N, K], or x [G, M, K] and weight [G, N, K]");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK((dtype == at::kBFloat16 || dtype == at::kFloat) && weight_in.scalar_type() == dtype &&
                  x_in.device().is_cpu() && weight_in.device().is_cpu(),
              "small_matmul: bfloat16 or float32 CPU tensors, x and the weight alike");
  const int64_t K = x_in.size(-1);
  TORCH_CHECK(K % (dtype == at::kFloat ? Fp32Step::values : Bf16Step::values) == 0,
              "small_matmul: K must be a multiple of 32 (bfloat16) or 16 (float32)");
  const auto x = linear ? x_in.reshape({1, -1, K}) : x_in;
  const auto weight = linear ? weight_in.unsqueeze(0) : weight_in;
  // x may be strided over its groups and rows (a permuted view), not along K
  const auto xs = x.stride(2) == 1 ? x : x.contiguous();
  const auto w = weight.contiguous();
  auto out = at::empty({x.size(0), x.size(1), weight.size(1)}, x.options());
  const int64_t G = x.size(0), M = x.size(1), N = weight.size(1);
  if (dtype == at::kBFloat16)
    small_matmul({Product<bf16>{xs.data_ptr<bf16>(), G, M, K, xs.stride(0), xs.stride(1), w.data_ptr<bf16>(), N,
                                out.data_ptr<bf16>()}});
  else
    small_matmul({Product<float>{xs.data_ptr<float>(), G, M, K, xs.stride(0), xs.stride(1), w.data_ptr<float>(), N,
                                 out.data_ptr<float>()}});
  if (!linear) return out;
  auto sizes = x_in.sizes().vec();
  sizes.back() = weight_in.size(0);
  return out.view(sizes);
}

}  // namespace dsv2_cpu

// The library-wide switch of the AMX paths (common.h): use_amx(false) runs every bf16 product on AVX-512 registers.
// → whether the AMX paths are in use after the call (never where the CPU or Linux does not grant AMX).
bool use_amx(bool on) {
  dsv2_cpu::amx_wanted().store(on);
  return dsv2_cpu::amx_usable();
}

bool balance_tasks(bool on) {
  dsv2_cpu::tasks_balanced().store(on);
  return on;
}

TORCH_LIBRARY_FRAGMENT(dsv2_cpu, m) {
  m.def("small_matmul(Tensor x, Tensor weight) -> Tensor");
  m.def("use_amx(bool on) -> bool", &use_amx);
  m.def("balance_tasks(bool on) -> bool", &balance_tasks);
}

TORCH_LIBRARY_IMPL(dsv2_cpu, CPU, m) {  // the overload on tensors
  using OnTensors = at::Tensor (*)(const at::Tensor&, const at::Tensor&);
  m.impl("small_matmul", static_cast<OnTensors>(&dsv2_cpu::small_matmul));
}
