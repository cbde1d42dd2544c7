// The routed experts of a decoding step on CPU: bf16 on the AMX tiles where the CPU has them (Intel Xeon 4th
// generation and later), float32 with AVX-512 FMAs.
//
//   out[n] = Σ_slot down_e(h),  h = round(silu(gate_e · x_n) * (up_e · x_n)) · w[n, slot],  e = expert_ids[n, slot]
//
// with the same bf16 roundings as dsv2's torch path (after each projection, the SiLU, the product and the scaling;
// the k slots summed in float32 in slot order). What it saves over batched matmuls: the weights are the tiles' A
// operand exactly as stored ([rows, K] row-major, no repacking), each expert's weights are read once per step whatever
// its token count (≤ 16 tokens per pass; more re-read them from cache), and the next task's weights are prefetched
// while the current one computes. The tokens are the B operand: an expert's (≤ 16) input rows, and its hidden
// activations, are laid out pair-interleaved ([K/2][16][2], what TDPBF16PS reads), which costs little at these sizes.
// float32 computes the same with register tiles of dot products (4 weight rows against ≤ 8 of an expert's tokens),
// without roundings; so does bf16 where experts average ≤ 2 tokens (a decoding step of a few sequences), with its
// roundings: there the AMX tiles' 16 token columns would stay mostly empty, and the weights stream faster this way.
// Without AMX (AMD Zen 4, say), bf16 takes the register tiles (VDPBF16PS) at every token count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

using namespace dsv2_cpu;

// Prefetch part `step` of `steps` of a contiguous block into L1: the next task's weights, spread over this one's steps.
inline void prefetch_part(const void* block, int64_t bytes, int64_t step, int64_t steps) {
  const char* p = static_cast<const char*>(block);
  const int64_t part = bytes / steps;
  for (int64_t offset = step * part; offset < (step + 1) * part; offset += 64) _mm_prefetch(p + offset, _MM_HINT_T0);
}

// bf16 takes the register tiles while experts average at most this many tokens (AMX tiles beyond). Measured against
// the AMX path, 32 experts of 1024 → 352: 1.29× at 1 token per expert, 1.10× at ~1.5, equal at ~2, 0.92× at 4.
constexpr int64_t BF16_DOTS_MAX_TOKENS = 2;

struct Group {  // up to 16 (register tiles: 8) assignments of one expert: order[first, first + count)
  int64_t first, count;
};

// What both implementations read and write.
struct Experts {
  int64_t H, k, I;
  const float* w;  // [N·k] combine weights
  const std::vector<int64_t>& order;  // assignments grouped by expert
  const std::vector<Group>& groups;
  const std::vector<int64_t>& active;  // the experts with assignments
  const std::vector<int64_t>& first_group;  // active[i]'s groups: [first_group[i], first_group[i + 1])
  float* y;  // [N·k, H] each assignment's output
};

// bf16 on the AMX tiles.
void experts_amx(const Experts& c, const bf16* x, const bf16* gate_w, const bf16* up_w, const bf16* down_w) {
  const int64_t H = c.H, k = c.k, I = c.I;
  const float* w = c.w;
  const auto& order = c.order;
  const auto& groups = c.groups;
  const auto& active = c.active;
  const auto& first_group = c.first_group;
  const int64_t G = groups.size(), experts = active.size();

  // Each group's input rows, pair-interleaved: xv[g][K/2][16 tokens] of bf16 pairs (absent tokens are zeros).
  uint32_t* xv = scratch<uint32_t, 10>(G * (H / 2) * TILE);
  uint32_t* hv = scratch<uint32_t, 11>(G * (I / 2) * TILE);
  const uint32_t* x_pairs = reinterpret_cast<const uint32_t*>(x);
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      uint32_t* dst = &xv[g * (H / 2) * TILE];
      for (int64_t t = 0; t < TILE; ++t) {
        const uint32_t* src = t < groups[g].count ? x_pairs + (order[groups[g].first + t] / k) * (H / 2) : nullptr;
        for (int64_t kk = 0; kk < H / 2; ++kk) dst[kk * TILE + t] = src ? src[kk] : 0;
      }
    }
  });

  // h = silu(gate · x) * (up · x) · w per 16 intermediate rows of one expert; written pair-interleaved into hv.
  const int64_t i_tiles = I / TILE, gate_up_tasks = experts * i_tiles;
  at::parallel_for(0, gate_up_tasks, 1, [&](int64_t begin, int64_t end) {
    configure_tiles(5);  // 0-1: accumulators, 2-3: weights, 4: tokens
    alignas(64) float gate_out[TILE * TILE], up_out[TILE * TILE];  // [16 rows][16 tokens]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ai = task / i_tiles, i0 = (task % i_tiles) * TILE;
      const int64_t offset = (active[ai] * I + i0) * H;  // rows i0..i0+15 of the expert: [16, H] contiguous
      const int64_t next = std::min(task + 1, gate_up_tasks - 1);
      const int64_t next_offset = (active[next / i_tiles] * I + (next % i_tiles) * TILE) * H;
      for (int64_t g = first_group[ai]; g < first_group[ai + 1]; ++g) {
        _tile_zero(0);
        _tile_zero(1);
        const uint32_t* b = &xv[g * (H / 2) * TILE];
        for (int64_t k0 = 0; k0 < H; k0 += KSTEP) {
          if (g == first_group[ai]) {
            prefetch_part(gate_w + next_offset, TILE * H * 2, k0 / KSTEP, H / KSTEP);
            prefetch_part(up_w + next_offset, TILE * H * 2, k0 / KSTEP, H / KSTEP);
          }
          _tile_loadd(4, b + (k0 / 2) * TILE, 64);
          _tile_loadd(2, gate_w + offset + k0, H * 2);
          _tile_loadd(3, up_w + offset + k0, H * 2);
          _tile_dpbf16ps(0, 2, 4);
          _tile_dpbf16ps(1, 3, 4);
        }
        _tile_stored(0, gate_out, 64);
        _tile_stored(1, up_out, 64);
        bf16* h = reinterpret_cast<bf16*>(&hv[g * (I / 2) * TILE]);  // [I/2][16][2]
        for (int64_t t = groups[g].count; t < TILE; ++t)  // absent tokens: zeros (the buffer holds old values)
          for (int64_t r = 0; r < TILE; ++r) h[(((i0 + r) / 2) * TILE + t) * 2 + (i0 + r) % 2] = bf16(0.0f);
        for (int64_t t = 0; t < groups[g].count; ++t) {
          const float scale = round_bf16(w[order[groups[g].first + t]]);
          for (int64_t r = 0; r < TILE; ++r) {
            const float gv = round_bf16(gate_out[r * TILE + t]), uv = round_bf16(up_out[r * TILE + t]);
            const float act = round_bf16(gv / (1.0f + std::exp(-gv)));
            const int64_t i = i0 + r;
            h[((i / 2) * TILE + t) * 2 + i % 2] = static_cast<bf16>(round_bf16(act * uv) * scale);
          }
        }
      }
    }
    _tile_release();
  });

  // ys[a] = down · h per 32 output rows of one expert (two tiles sharing the tokens' tile), rounded to bf16.
  float* y = c.y;
  const int64_t j_tiles = H / (2 * TILE), down_tasks = experts * j_tiles;
  at::parallel_for(0, down_tasks, 1, [&](int64_t begin, int64_t end) {
    configure_tiles(5);  // 0-1: accumulators, 2-3: weights, 4: tokens
    alignas(64) float out0[TILE * TILE], out1[TILE * TILE];  // [16 rows][16 tokens]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ai = task / j_tiles, j0 = (task % j_tiles) * 2 * TILE;
      const bf16* rows = down_w + (active[ai] * H + j0) * I;  // [32, I] contiguous
      const int64_t next = std::min(task + 1, down_tasks - 1);
      const bf16* next_rows = down_w + (active[next / j_tiles] * H + (next % j_tiles) * 2 * TILE) * I;
      for (int64_t g = first_group[ai]; g < first_group[ai + 1]; ++g) {
        _tile_zero(0);
        _tile_zero(1);
        const uint32_t* b = &hv[g * (I / 2) * TILE];
        for (int64_t k0 = 0; k0 < I; k0 += KSTEP) {
          if (g == first_group[ai]) prefetch_part(next_rows, 2 * TILE * I * 2, k0 / KSTEP, I / KSTEP);
          _tile_loadd(4, b + (k0 / 2) * TILE, 64);
          _tile_loadd(2, rows + k0, I * 2);
          _tile_loadd(3, rows + TILE * I + k0, I * 2);
          _tile_dpbf16ps(0, 2, 4);
          _tile_dpbf16ps(1, 3, 4);
        }
        _tile_stored(0, out0, 64);
        _tile_stored(1, out1, 64);
        for (int64_t t = 0; t < groups[g].count; ++t) {
          float* dst = y + order[groups[g].first + t] * H + j0;
          for (int64_t r = 0; r < TILE; ++r) {
            dst[r] = round_bf16(out0[r * TILE + t]);
            dst[TILE + r] = round_bf16(out1[r * TILE + t]);
          }
        }
      }
    }
    _tile_release();
  });
}

// h = silu(g) · u · w for one assignment's row: float32 as is; bf16 with the AMX path's roundings (g and u arrive
// rounded, the SiLU and the product are rounded, then scaled by the rounded weight and rounded once more).
inline float hidden_value(float g, float u, float w) { return g / (1.0f + std::exp(-g)) * u * w; }
inline bf16 hidden_value(bf16 g, bf16 u, float w) {
  const float gv = static_cast<float>(g);
  const float act = round_bf16(gv / (1.0f + std::exp(-gv)));
  return static_cast<bf16>(round_bf16(act * static_cast<float>(u)) * round_bf16(w));
}

// Register tiles of dot products (AVX-512 FMAs in float32, VDPBF16PS in bf16): each expert's weights 4 rows at a time
// against ≤ 8 of its tokens. float32 always; bf16 when experts have few tokens each, where the AMX tiles' 16 token
// columns would stay mostly empty and the weights stream faster this way. The shared experts, where given, run as
// one more expert of every token (combine weight 1) in the same two parallel regions: the threads meet twice per
// layer instead of four times.
template <typename Step>
void experts_dots(const Experts& c, const RoutedExperts<typename Step::T>& p) {
  using T = typename Step::T;
  const T *x = p.x, *gate_w = p.gate, *up_w = p.up, *down_w = p.down;
  const int64_t H = c.H, k = c.k, I = c.I, N = p.N, S = p.shared_gate ? p.shared_I : 0;
  const auto& order = c.order;
  const auto& groups = c.groups;
  const auto& active = c.active;
  const auto& first_group = c.first_group;
  T* hs = scratch<T, 12>(order.size() * I);  // [assignment in expert order][I] (order holds ≥ as many)
  T* shared_hs = scratch<T, 14>(N * S);  // [token][shared_I]
  // the shared experts' tokens, 8 at a time: rows [count] of rows_of (row_stride apart) from token n0 on
  auto token_groups = [&](const T* rows_of, int64_t row_stride, auto&& fn) {
    for (int64_t n0 = 0; n0 < N; n0 += TILE_INPUTS) {
      const int64_t count = std::min(TILE_INPUTS, N - n0);
      const T* rows[TILE_INPUTS];
      for (int64_t m = 0; m < count; ++m) rows[m] = rows_of + (n0 + m) * row_stride;
      fn(n0, count, rows);
    }
  };
  const int64_t i_blocks = I / TILE, routed_gate_up = active.size() * i_blocks;
  parallel_tasks(routed_gate_up + S / TILE, 1, [&](int64_t begin, int64_t end) {
    T g[TILE_INPUTS][4], u[TILE_INPUTS][4];  // [token][weight row]
    for (int64_t task = begin; task < end; ++task) {
      if (task >= routed_gate_up) {  // rows i0..i0+15 of the shared experts' gate and up
        const int64_t i0 = (task - routed_gate_up) * TILE;
        for (int64_t r0 = 0; r0 < TILE; r0 += 4)
          token_groups(x, H, [&](int64_t n0, int64_t count, const T* const* rows) {
            tile_any<Step, 4>(p.shared_gate + (i0 + r0) * H, rows, count, H, &g[0][0], 4);
            tile_any<Step, 4>(p.shared_up + (i0 + r0) * H, rows, count, H, &u[0][0], 4);
            for (int64_t m = 0; m < count; ++m)
              for (int r = 0; r < 4; ++r) shared_hs[(n0 + m) * S + i0 + r0 + r] = hidden_value(g[m][r], u[m][r], 1.0f);
          });
        continue;
      }
      const int64_t ai = task / i_blocks, i0 = (task % i_blocks) * TILE;
      const int64_t offset = (active[ai] * I + i0) * H;  // rows i0..i0+15 of the expert
      for (int64_t r0 = 0; r0 < TILE; r0 += 4)
        for (int64_t gi = first_group[ai]; gi < first_group[ai + 1]; ++gi) {
          const Group& group = groups[gi];
          const T* rows[TILE_INPUTS];
          for (int64_t m = 0; m < group.count; ++m) rows[m] = x + (order[group.first + m] / k) * H;
          tile_any<Step, 4>(gate_w + offset + r0 * H, rows, group.count, H, &g[0][0], 4);
          tile_any<Step, 4>(up_w + offset + r0 * H, rows, group.count, H, &u[0][0], 4);
          for (int64_t m = 0; m < group.count; ++m) {
            const float scale = c.w[order[group.first + m]];
            for (int r = 0; r < 4; ++r) hs[(group.first + m) * I + i0 + r0 + r] = hidden_value(g[m][r], u[m][r], scale);
          }
        }
    }
  });
  const int64_t j_blocks = H / (2 * TILE), routed_down = active.size() * j_blocks;
  parallel_tasks(routed_down + (S ? j_blocks : 0), 1, [&](int64_t begin, int64_t end) {
    T out[TILE_INPUTS][4];  // [token][weight row]
    for (int64_t task = begin; task < end; ++task) {
      if (task >= routed_down) {  // output columns j0..j0+31 of the shared experts
        const int64_t j0 = (task - routed_down) * 2 * TILE;
        for (int64_t r0 = 0; r0 < 2 * TILE; r0 += 4)
          token_groups(shared_hs, S, [&](int64_t n0, int64_t count, const T* const* rows) {
            tile_any<Step, 4>(p.shared_down + (j0 + r0) * S, rows, count, S, &out[0][0], 4);
            for (int64_t m = 0; m < count; ++m)
              for (int r = 0; r < 4; ++r) p.shared_out[(n0 + m) * H + j0 + r0 + r] = out[m][r];
          });
        continue;
      }
      const int64_t ai = task / j_blocks, j0 = (task % j_blocks) * 2 * TILE;
      const T* rows_w = down_w + (active[ai] * H + j0) * I;  // [32, I]
      for (int64_t r0 = 0; r0 < 2 * TILE; r0 += 4)
        for (int64_t gi = first_group[ai]; gi < first_group[ai + 1]; ++gi) {
          const Group& group = groups[gi];
          const T* rows[TILE_INPUTS];
          for (int64_t m = 0; m < group.count; ++m) rows[m] = &hs[(group.first + m) * I];
          tile_any<Step, 4>(rows_w + r0 * I, rows, group.count, I, &out[0][0], 4);
          for (int64_t m = 0; m < group.count; ++m)
            for (int r = 0; r < 4; ++r)
              c.y[order[group.first + m] * H + j0 + r0 + r] = static_cast<float>(out[m][r]);
        }
    }
  });
}

}  // namespace

namespace dsv2_cpu {

template <typename T>
bool routed_experts(const RoutedExperts<T>& p) {
  const int64_t N = p.N, H = p.H, k = p.k, E = p.E, I = p.I;
  const int64_t A = N * k;  // assignments a = n·k + slot
  const int64_t* id = p.ids;
  const float* w = p.weights;
  auto mine = [&](int64_t a) { return id[a] >= 0 && id[a] < E; };  // ids outside [0, E): not these experts

  // Assignments grouped by expert, in token order within one (a counting sort), then cut into groups of ≤ 16 (an
  // AMX tile's columns) or ≤ 8 (what a register tile takes: float32, and bf16 with few tokens per expert).
  std::vector<int64_t> start(E + 1, 0), order(A);
  for (int64_t a = 0; a < A; ++a)
    if (mine(a)) ++start[id[a] + 1];
  int64_t used = 0;  // experts with assignments
  for (int64_t e = 0; e < E; ++e) used += start[e + 1] > 0;
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  const bool amx = std::is_same_v<T, bf16> && start[E] > BF16_DOTS_MAX_TOKENS * used && amx_usable();
  const int64_t group_size = amx ? TILE : TILE_INPUTS;
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t a = 0; a < A; ++a)
      if (mine(a)) order[next[id[a]]++] = a;
  }
  std::vector<Group> groups;
  std::vector<int64_t> active, first_group;  // the experts with assignments; [i, i+1): active[i]'s groups
  for (int64_t e = 0; e < E; ++e) {
    if (start[e + 1] == start[e]) continue;
    active.push_back(e);
    first_group.push_back(groups.size());
    for (int64_t f = start[e]; f < start[e + 1]; f += group_size)
      groups.push_back({f, std::min(group_size, start[e + 1] - f)});
  }
  first_group.push_back(groups.size());

  Experts job{H, k, I, w, order, groups, active, first_group, scratch<float, 13>(A * H)};  // y: [N·k, H]
  if constexpr (std::is_same_v<T, bf16>) {
    if (amx)
      experts_amx(job, p.x, p.gate, p.up, p.down);
    else
      experts_dots<Bf16Step>(job, p);
  } else {
    experts_dots<Fp32Step>(job, p);
  }
  float* y = job.y;
  for (int64_t a = 0; a < A; ++a)  // assignments to other experts add nothing
    if (!mine(a)) std::memset(y + a * H, 0, H * sizeof(float));

  // Σ over the k slots in slot order, in float32.
  float* o = p.out;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      std::memcpy(o + n * H, y + n * k * H, H * sizeof(float));
      for (int64_t slot = 1; slot < k; ++slot) {
        const float* src = y + (n * k + slot) * H;
        for (int64_t j = 0; j < H; ++j) o[n * H + j] += src[j];
      }
    }
  });
  return p.shared_gate != nullptr && !amx;
}

template bool routed_experts(const RoutedExperts<bf16>& p);
template bool routed_experts(const RoutedExperts<float>& p);

at::Tensor routed_experts(const at::Tensor& x_in, const at::Tensor& ids_in, const at::Tensor& weights_in,
                          const at::Tensor& gate_in, const at::Tensor& up_in, const at::Tensor& down_in) {
  TORCH_CHECK(x_in.dim() == 2 && ids_in.dim() == 2 && weights_in.sizes() == ids_in.sizes() &&
                  ids_in.size(0) == x_in.size(0),
              "routed_experts: x [N, H], expert_ids and weights [N, k]");
  TORCH_CHECK(gate_in.dim() == 3 && up_in.sizes() == gate_in.sizes() && gate_in.size(2) == x_in.size(1) &&
                  down_in.dim() == 3 && down_in.size(0) == gate_in.size(0) && down_in.size(1) == x_in.size(1) &&
                  down_in.size(2) == gate_in.size(1),
              "routed_experts: gate and up [E, I, H], down [E, H, I]");
  const auto dtype = x_in.scalar_type();
  for (const auto* t : {&x_in, &gate_in, &up_in, &down_in})
    TORCH_CHECK((dtype == at::kBFloat16 || dtype == at::kFloat) && t->scalar_type() == dtype && t->device().is_cpu(),
                "routed_experts: bfloat16 or float32 CPU tensors, x and the weights alike");
  const int64_t N = x_in.size(0), H = x_in.size(1), k = ids_in.size(1), E = gate_in.size(0), I = gate_in.size(1);
  TORCH_CHECK(H % KSTEP == 0 && I % KSTEP == 0,
              "routed_experts: hidden and intermediate sizes must be multiples of 32");
  const auto x = x_in.contiguous(), ids = ids_in.to(at::kLong).contiguous();
  const auto weights = weights_in.to(at::kFloat).contiguous();
  const auto gate = gate_in.contiguous(), up = up_in.contiguous(), down = down_in.contiguous();
  auto out = at::empty({N, H}, x.options().dtype(at::kFloat));
  if (dtype == at::kBFloat16)
    routed_experts(RoutedExperts<bf16>{x.data_ptr<bf16>(), N, H, ids.data_ptr<int64_t>(), weights.data_ptr<float>(), k,
                                       gate.data_ptr<bf16>(), up.data_ptr<bf16>(), down.data_ptr<bf16>(), E, I,
                                       out.data_ptr<float>()});
  else
    routed_experts(RoutedExperts<float>{x.data_ptr<float>(), N, H, ids.data_ptr<int64_t>(), weights.data_ptr<float>(),
                                        k, gate.data_ptr<float>(), up.data_ptr<float>(), down.data_ptr<float>(), E, I,
                                        out.data_ptr<float>()});
  return out;
}

}  // namespace dsv2_cpu

TORCH_LIBRARY_FRAGMENT(dsv2_cpu, m) {
  m.def("routed_experts(Tensor x, Tensor expert_ids, Tensor weights, Tensor gate, Tensor up, Tensor down) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv2_cpu, CPU, m) {  // the overload on tensors
  using OnTensors = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&);
  m.impl("routed_experts", static_cast<OnTensors>(&dsv2_cpu::routed_experts));
}
