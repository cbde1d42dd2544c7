// MLA's absorbed decoding attention on CPU, read straight from the paged latent cache: bf16 on the AMX tiles where the
// CPU has them (AVX512-BF16 dot products and FMAs elsewhere), float32 with AVX-512 FMAs.
//
//   out[b, h] = Σ_{s < length[b]} softmax_s(scale · q[b, h] · L[slot[b, s]]) · L[slot[b, s], :r]
//
// where L is one layer's cache ([slots, D], D = r + d_R: each token's normalized latent then its roped k_pe): one key
// and one value per token shared by every head, so all of a sequence's heads go through the tiles together. No
// gathered copy of the contexts and no mask are built: each task gathers its ≤ 256 keys (one sequence's chunk) into a
// buffer that serves both products, computes the scores with tiles (A: 16 key rows, B: the queries pair-interleaved),
// a float32 softmax per head, and the value product with tiles (A: the bf16 probabilities [16 heads][32 keys], B: 32
// keys × 16 values pair-interleaved by permutes); a sequence's chunks are merged by their maxima, as split-K flash
// decoding does. The probabilities are rounded to bf16 for their product, as torch's fused CPU kernel does. float32
// takes the same chunks, with the queries (scores) and the probabilities (values) as the vectors of its FMAs; bf16
// without AMX the same chunks with dot products of pairs for the scores (see attend_chunks for bf16).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"

namespace {

using namespace dsv2_cpu;
constexpr int64_t CHUNK = 256;  // keys per task
constexpr int64_t DBLOCKS = 4;  // 16-value blocks of the output per pass over a chunk (tiles 0-3)

// e^x for x ≤ 0 (x > -87: no denormals): 2^n · 2^f, n = round(x·log2 e), |f| ≤ 1/2, 2^f by its Taylor series to f⁷.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  constexpr float c[8] = {1.0f, 0.693147181f, 0.240226507f, 0.0555041087f, 0.00961812911f, 0.00133335581f,
                          0.000154035304f, 0.0000152527338f};  // ln2^k / k!
  __m512 p = _mm512_set1_ps(c[7]);
  for (int k = 6; k >= 0; --k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[k]));
  return _mm512_scalef_ps(p, n);
}

// The 16 × 16 matrix whose rows are r[0..15], transposed in place: pairs of rows interleaved, then pairs of pairs,
// then 128-bit blocks gathered.
inline void transpose16(__m512* r) {
  __m512 t[TILE];
  for (int i = 0; i < TILE; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < TILE; i += 4) {  // r[i + c], block L: rows i..i+3, column 4L + c
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 lo01 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), hi01 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
    const __m512 lo23 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const __m512 hi23 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
    t[c] = _mm512_shuffle_f32x4(lo01, lo23, 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(hi01, hi23, 0x88);
    t[8 + c] = _mm512_shuffle_f32x4(lo01, lo23, 0xDD);
    t[12 + c] = _mm512_shuffle_f32x4(hi01, hi23, 0xDD);
  }
  for (int i = 0; i < TILE; ++i) r[i] = t[i];
}

// The pairs q[h][0 .. pairs) of hn ≤ 16 heads (q's rows, `pairs` a multiple of 16) as [pairs][16 heads], the absent
// heads' zeros: 16 × 16 blocks through transpose16 (bits moved, no arithmetic).
inline void heads_in_lanes(const uint32_t* q, int64_t hn, int64_t pairs, uint32_t* out) {
  for (int64_t d0 = 0; d0 < pairs; d0 += TILE) {
    __m512 block[TILE];
    for (int64_t h = 0; h < TILE; ++h)
      block[h] = h < hn ? _mm512_castsi512_ps(_mm512_loadu_si512(q + h * pairs + d0)) : _mm512_setzero_ps();
    transpose16(block);
    for (int64_t i = 0; i < TILE; ++i) _mm512_storeu_ps(reinterpret_cast<float*>(out + (d0 + i) * TILE), block[i]);
  }
}

// The softmax numerators e^(scale·(score − maximum)) of a chunk's scores [key][16 heads] (keys from n to padded, a
// multiple of 16: 0), 16 keys at a time turned to [head][key] and handed to store(j0, p), p[h] = head h's numerators of
// keys j0 .. j0 + 15. → the heads' maxima and the sums of their numerators (float32, before any rounding).
template <typename Store>
inline std::pair<__m512, __m512> softmax_numerators(const float* scores, int64_t n, int64_t padded, float scale,
                                                    Store store) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; ++j) top = _mm512_max_ps(top, _mm512_load_ps(&scores[j * TILE]));
  const __m512 scale_v = _mm512_set1_ps(scale), top_scaled = _mm512_mul_ps(top, scale_v);
  __m512 total = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < padded; j0 += TILE) {
    __m512 p[TILE];
    for (int64_t i = 0; i < TILE; ++i) {
      const int64_t j = j0 + i;
      p[i] = j < n ? exp_ps(_mm512_fmsub_ps(_mm512_load_ps(&scores[j * TILE]), scale_v, top_scaled))
                   : _mm512_setzero_ps();
      total = _mm512_add_ps(total, p[i]);
    }
    transpose16(p);
    store(j0, p);
  }
  return {top, total};
}

struct Task {  // keys [start, start + count) of sequence b
  int64_t b, start, count;
};

// What every chunk task reads and writes.
struct Chunks {
  std::vector<Task> tasks;
  std::vector<int64_t> first_task;  // sequence b's tasks: [first_task[b], first_task[b + 1])
  const int64_t* slot;  // [B, S]
  int64_t S, heads, D, r, groups, padded_heads, row_stride;
  float scale;
  // per task and head: the scores' maximum, Σ exp(scale·(score − maximum)), and Σ exp(...)·value [r]
  float *maxima, *sums, *partial;
};

// bf16: both products on the tiles.
void attend_chunks_amx(Chunks& c, const bf16* rows, const bf16* queries) {
  const int64_t S = c.S, heads = c.heads, D = c.D, r = c.r, groups = c.groups, padded_heads = c.padded_heads;
  const int64_t row_stride = c.row_stride, T = c.tasks.size();
  const int64_t* slot = c.slot;
  auto& tasks = c.tasks;
  float* maxima = c.maxima;
  float* sums = c.sums;
  float* partial = c.partial;
  const int64_t value_blocks = r / TILE;
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    configure_tiles(8);  // 0-3: accumulators, 4: probabilities, 5-6: B operands, 7: keys
    bf16* keys = scratch<bf16, 0>((CHUNK + KSTEP) * D);  // copies of the rows of key tiles not contiguous in the cache
    bf16* zeros = scratch<bf16, 1>(D);  // the row of a padding key
    std::fill(zeros, zeros + D, bf16(0.0f));
    const bf16** key_rows = scratch<const bf16*, 0>(CHUNK + KSTEP);  // [key] its row, wherever it lies
    const bf16** tile_rows = scratch<const bf16*, 1>((CHUNK + KSTEP) / TILE);  // [16 keys] the first one's row
    int64_t* tile_strides = scratch<int64_t, 0>((CHUNK + KSTEP) / TILE);  // [16 keys] elements from row to row
    // the values pair-interleaved per 32 keys and 16 values: [CHUNK/32][r/16][16 key pairs][16 values][2]
    uint16_t* values_vnni = scratch<uint16_t, 0>(CHUNK / KSTEP * value_blocks * TILE * 2 * TILE);
    uint32_t* q_pairs = scratch<uint32_t, 0>(groups * (D / 2) * TILE);  // [group][D/2][16 heads] pair-interleaved
    int64_t q_pairs_of = -1;  // the sequence whose queries q_pairs holds (a thread's chunks come in sequence order)
    alignas(64) float scores[CHUNK * TILE];  // [key][16 heads]
    alignas(64) bf16 probs[TILE * CHUNK];  // [16 heads][key]
    const __m512i interleave = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7,
                                                 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    for (int64_t t = begin; t < end; ++t) {
      const auto [b, start, n] = tasks[t];
      const int64_t padded = (n + KSTEP - 1) / KSTEP * KSTEP;
      const int64_t* chunk_slots = slot + b * S + start;
      // Key tiles are read where they lie when their 16 rows are consecutive cache rows (a paged cache's block, a
      // contiguous cache's run); others (and the padding) are copied together first.
      for (int64_t j0 = 0; j0 < padded; j0 += TILE) {
        bool in_place = j0 + TILE <= n;
        for (int64_t i = 1; i < TILE && in_place; ++i) in_place = chunk_slots[j0 + i] == chunk_slots[j0] + i;
        if (in_place) {
          tile_rows[j0 / TILE] = rows + chunk_slots[j0] * row_stride;
          tile_strides[j0 / TILE] = row_stride;
        } else {
          for (int64_t j = j0; j < j0 + TILE; ++j)
            std::memcpy(&keys[j * D], j < n ? rows + chunk_slots[j] * row_stride : zeros, D * 2);
          tile_rows[j0 / TILE] = &keys[j0 * D];
          tile_strides[j0 / TILE] = D;
        }
        for (int64_t i = 0; i < TILE; ++i) key_rows[j0 + i] = tile_rows[j0 / TILE] + i * tile_strides[j0 / TILE];
      }
      // this thread's next chunk: its rows are prefetched into L2 along the way (they lie scattered over the cache,
      // where the hardware prefetcher alone streams them at a fraction of the memory's rate)
      const int64_t* next_slots = t + 1 < end ? slot + tasks[t + 1].b * S + tasks[t + 1].start : nullptr;
      const int64_t next_n = t + 1 < end ? tasks[t + 1].count : 0;
      for (int64_t j0 = 0; j0 < padded; j0 += KSTEP) {
        for (int64_t j = j0; j < std::min(j0 + KSTEP, next_n); ++j) {
          const char* row = reinterpret_cast<const char*>(rows + next_slots[j] * row_stride);
          for (int64_t byte = 0; byte < D * 2; byte += 64) _mm_prefetch(row + byte, _MM_HINT_T1);
        }
        for (int64_t v = 0; v < value_blocks; ++v) {
          uint16_t* dst = &values_vnni[((j0 / KSTEP) * value_blocks + v) * TILE * 2 * TILE];
          for (int64_t kk = 0; kk < TILE; ++kk) {
            const auto* even_row = reinterpret_cast<const __m256i*>(key_rows[j0 + 2 * kk] + v * TILE);
            const auto* odd_row = reinterpret_cast<const __m256i*>(key_rows[j0 + 2 * kk + 1] + v * TILE);
            const __m512i even = _mm512_castsi256_si512(_mm256_loadu_si256(even_row));
            const __m512i odd = _mm512_castsi256_si512(_mm256_loadu_si256(odd_row));
            _mm512_storeu_si512(dst + kk * 2 * TILE, _mm512_permutex2var_epi16(even, interleave, odd));
          }
        }
      }
      if (q_pairs_of != b) {
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t h0 = g * TILE, hn = std::min(TILE, heads - h0);
          const uint32_t* q32 = reinterpret_cast<const uint32_t*>(queries + (b * heads + h0) * D);
          uint32_t* dst = &q_pairs[g * (D / 2) * TILE];
          for (int64_t kk = 0; kk < D / 2; ++kk)
            for (int64_t h = 0; h < TILE; ++h) dst[kk * TILE + h] = h < hn ? q32[h * (D / 2) + kk] : 0;
        }
        q_pairs_of = b;
      }
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t h0 = g * TILE;
        const uint32_t* group_q = &q_pairs[g * (D / 2) * TILE];
        // scores [key][head] = keys · queries, 4 × 16 keys at a time (independent accumulators)
        for (int64_t j0 = 0; j0 < padded; j0 += 4 * TILE) {
          const int64_t blocks = std::min<int64_t>(4, (padded - j0) / TILE);
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          const int64_t t0 = j0 / TILE;
          for (int64_t k0 = 0; k0 < D; k0 += KSTEP) {
            _tile_loadd(5, &group_q[(k0 / 2) * TILE], 64);
            _tile_loadd(7, tile_rows[t0] + k0, tile_strides[t0] * 2);
            _tile_dpbf16ps(0, 7, 5);
            _tile_loadd(6, tile_rows[t0 + 1] + k0, tile_strides[t0 + 1] * 2);
            _tile_dpbf16ps(1, 6, 5);
            if (blocks == 4) {
              _tile_loadd(7, tile_rows[t0 + 2] + k0, tile_strides[t0 + 2] * 2);
              _tile_dpbf16ps(2, 7, 5);
              _tile_loadd(6, tile_rows[t0 + 3] + k0, tile_strides[t0 + 3] * 2);
              _tile_dpbf16ps(3, 6, 5);
            }
          }
          _tile_stored(0, &scores[j0 * TILE], 64);
          _tile_stored(1, &scores[(j0 + TILE) * TILE], 64);
          if (blocks == 4) {
            _tile_stored(2, &scores[(j0 + 2 * TILE) * TILE], 64);
            _tile_stored(3, &scores[(j0 + 3 * TILE) * TILE], 64);
          }
        }
        // softmax numerators per head, rounded to bf16 for the value product
        const auto [top, total] = softmax_numerators(scores, n, padded, c.scale, [&](int64_t j0, __m512* p) {
          for (int64_t h = 0; h < TILE; ++h)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(&probs[h * CHUNK + j0]), (__m256i)_mm512_cvtneps_pbh(p[h]));
        });
        _mm512_storeu_ps(&maxima[t * padded_heads + h0], top);
        _mm512_storeu_ps(&sums[t * padded_heads + h0], total);
        // Σ_j probs[h][j] · values[j], DBLOCKS blocks of 16 values per pass over the chunk
        for (int64_t v0 = 0; v0 < value_blocks; v0 += DBLOCKS) {
          const int64_t blocks = std::min(DBLOCKS, value_blocks - v0);
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          for (int64_t j0 = 0; j0 < padded; j0 += KSTEP) {
            _tile_loadd(4, &probs[j0], CHUNK * 2);
            const uint16_t* b_tiles = &values_vnni[((j0 / KSTEP) * value_blocks + v0) * TILE * 2 * TILE];
            _tile_loadd(5, b_tiles, 64);
            _tile_dpbf16ps(0, 4, 5);
            if (blocks > 1) {
              _tile_loadd(6, b_tiles + TILE * 2 * TILE, 64);
              _tile_dpbf16ps(1, 4, 6);
            }
            if (blocks > 2) {
              _tile_loadd(5, b_tiles + 2 * TILE * 2 * TILE, 64);
              _tile_dpbf16ps(2, 4, 5);
            }
            if (blocks > 3) {
              _tile_loadd(6, b_tiles + 3 * TILE * 2 * TILE, 64);
              _tile_dpbf16ps(3, 4, 6);
            }
          }
          float* out = &partial[(t * padded_heads + h0) * r + v0 * TILE];  // [16 heads][r]
          _tile_stored(0, out, r * 4);
          if (blocks > 1) _tile_stored(1, out + TILE, r * 4);
          if (blocks > 2) _tile_stored(2, out + 2 * TILE, r * 4);
          if (blocks > 3) _tile_stored(3, out + 3 * TILE, r * 4);
        }
      }
    }
    _tile_release();
  });

}

// bf16 without AMX: the scores with VDPBF16PS (the queries pair-interleaved as the vector, a key's pair of values
// broadcast from its row), the value product with VDPBF16PS too (two keys' 16 values interleaved as the vector, a
// head's probabilities of those keys broadcast: half the instructions of float32 FMAs key by key, 1.38× faster
// attention at 32-2,048 keys), both products exact, float32 sums; the probabilities rounded to bf16 for theirs, as
// on the tiles.
void attend_chunks(Chunks& c, const bf16* rows, const bf16* queries) {
  const int64_t S = c.S, heads = c.heads, D = c.D, r = c.r, padded_heads = c.padded_heads;
  constexpr int64_t KEYS = 8;  // keys per score block (independent accumulators)
  at::parallel_for(0, static_cast<int64_t>(c.tasks.size()), 1, [&](int64_t begin, int64_t end) {
    bf16* zeros = scratch<bf16, 2>(D);  // the rows of the padding keys
    std::fill(zeros, zeros + D, bf16(0.0f));
    const bf16** keys = scratch<const bf16*, 2>(CHUNK + TILE + KEYS);  // the chunk's rows (then padding), in place
    uint32_t* q_pairs = scratch<uint32_t, 2>((D / 2) * TILE);  // [D/2][16 heads] pair-interleaved
    alignas(64) float scores[CHUNK * TILE];  // [key][16 heads]
    alignas(64) bf16 probs[TILE * CHUNK];  // [16 heads][key], rounded to bf16
    const auto* prob_pairs = reinterpret_cast<const uint32_t*>(probs);  // [16 heads][key / 2]: pairs of keys
    // vpermw's indices that interleave 16 values of key j (words 0-15) with key j + 1's (words 16-31)
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t t = begin; t < end; ++t) {
      const auto [b, start, n] = c.tasks[t];
      const int64_t padded = (n + TILE - 1) / TILE * TILE;
      const int64_t* chunk_slots = c.slot + b * S + start;
      for (int64_t j = 0; j < padded + KEYS; ++j) keys[j] = j < n ? rows + chunk_slots[j] * c.row_stride : zeros;
      for (int64_t g = 0; g < c.groups; ++g) {
        const int64_t h0 = g * TILE, hn = std::min(TILE, heads - h0);
        const auto* q = reinterpret_cast<const uint32_t*>(queries + (b * heads + h0) * D);  // [hn][D/2] pairs
        heads_in_lanes(q, hn, D / 2, q_pairs);
        for (int64_t j0 = 0; j0 < padded; j0 += KEYS) {  // scores[j] (16 heads) = Σ_d keys[j][d] · q[d]
          __m512 acc[KEYS];
          for (int64_t i = 0; i < KEYS; ++i) acc[i] = _mm512_setzero_ps();
          const uint32_t* k[2 * KEYS];  // this block's rows as pairs, then the next block's
          for (int64_t i = 0; i < 2 * KEYS; ++i) k[i] = reinterpret_cast<const uint32_t*>(keys[j0 + i]);
          for (int64_t d = 0; d < D / 2; ++d) {
            if (d % 16 == 0)  // the next block's rows, a cache line at a time: scattered slots defeat the prefetcher
              for (int64_t i = 0; i < KEYS; ++i)
                _mm_prefetch(reinterpret_cast<const char*>(k[KEYS + i] + d), _MM_HINT_T0);
            const __m512 qd = _mm512_castsi512_ps(_mm512_loadu_si512(&q_pairs[d * TILE]));
            for (int64_t i = 0; i < KEYS; ++i)
              acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)qd, (__m512bh)_mm512_set1_epi32(static_cast<int>(k[i][d])));
          }
          for (int64_t i = 0; i < KEYS; ++i) _mm512_store_ps(&scores[(j0 + i) * TILE], acc[i]);
        }
        const auto [top, total] = softmax_numerators(scores, n, padded, c.scale, [&](int64_t j0, __m512* p) {
          for (int64_t h = 0; h < TILE; ++h)  // rounded to bf16 for the value product
            _mm256_store_si256(reinterpret_cast<__m256i*>(&probs[h * CHUNK + j0]), (__m256i)_mm512_cvtneps_pbh(p[h]));
        });
        _mm512_storeu_ps(&c.maxima[t * padded_heads + h0], top);
        _mm512_storeu_ps(&c.sums[t * padded_heads + h0], total);
        float* out = &c.partial[(t * padded_heads + h0) * r];  // [16 heads][r]
        const int64_t pairs = (n + 1) / 2;  // the keys in pairs (a padding key's row and probability: zeros)
        for (int64_t v0 = 0; v0 < r; v0 += TILE) {  // out[h][v0 .. v0 + 15] = Σ_j probs[h][j] · keys[j][v0 ..]
          __m512 acc[TILE];
          for (int64_t h = 0; h < TILE; ++h) acc[h] = _mm512_setzero_ps();
          for (int64_t i = 0; i < pairs; ++i) {  // keys 2i and 2i + 1: their 16 values interleaved, as pairs
            const __m256i first = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys[2 * i] + v0));
            const __m256i second = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys[2 * i + 1] + v0));
            const __m512i values =
                _mm512_permutexvar_epi16(interleave, _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1));
            for (int64_t h = 0; h < TILE; ++h) {
              const __m512i p = _mm512_set1_epi32(static_cast<int>(prob_pairs[h * CHUNK / 2 + i]));
              acc[h] = _mm512_dpbf16_ps(acc[h], (__m512bh)p, (__m512bh)values);
            }
          }
          for (int64_t h = 0; h < TILE; ++h) _mm512_storeu_ps(&out[h * r + v0], acc[h]);
        }
      }
    }
  });
}

// float32: AVX-512 FMAs with one operand broadcast from memory (no rounding anywhere, as the float32 torch path).
void attend_chunks(Chunks& c, const float* rows, const float* queries) {
  const int64_t S = c.S, heads = c.heads, D = c.D, r = c.r, padded_heads = c.padded_heads;
  constexpr int64_t KEYS = 8;  // keys per score block (independent accumulators)
  constexpr int64_t VALUES = 16;  // values per pass of the value product (accumulators)
  at::parallel_for(0, static_cast<int64_t>(c.tasks.size()), 1, [&](int64_t begin, int64_t end) {
    float* zeros = scratch<float, 1>(D);  // the rows of the padding keys
    std::fill(zeros, zeros + D, 0.0f);
    const float** keys = scratch<const float*, 0>(CHUNK + 2 * KEYS);  // the chunk's rows (then padding), in place
    float* q_t = scratch<float, 2>(D * TILE);  // [D][16 heads]: the queries transposed
    float* scores = scratch<float, 3>(CHUNK * TILE);  // [key][16 heads]
    float* out_t = scratch<float, 4>(r * TILE);  // [value][16 heads]
    for (int64_t t = begin; t < end; ++t) {
      const auto [b, start, n] = c.tasks[t];
      const int64_t padded = (n + KEYS - 1) / KEYS * KEYS;
      const int64_t* chunk_slots = c.slot + b * S + start;
      for (int64_t j = 0; j < padded + KEYS; ++j) keys[j] = j < n ? rows + chunk_slots[j] * c.row_stride : zeros;
      for (int64_t g = 0; g < c.groups; ++g) {
        const int64_t h0 = g * TILE, hn = std::min(TILE, heads - h0);
        for (int64_t d = 0; d < D; ++d)
          for (int64_t h = 0; h < TILE; ++h) q_t[d * TILE + h] = h < hn ? queries[(b * heads + h0 + h) * D + d] : 0;
        for (int64_t j0 = 0; j0 < padded; j0 += KEYS) {  // scores[j] (16 heads) = Σ_d keys[j][d] · q_t[d]
          __m512 acc[KEYS];
          for (int64_t i = 0; i < KEYS; ++i) acc[i] = _mm512_setzero_ps();
          const float* const* k = &keys[j0];
          for (int64_t d = 0; d < D; ++d) {
            if (d % 16 == 0)  // the next block's rows, a cache line at a time: scattered slots defeat the prefetcher
              for (int64_t i = 0; i < KEYS; ++i)
                _mm_prefetch(reinterpret_cast<const char*>(k[KEYS + i] + d), _MM_HINT_T0);
            const __m512 qd = _mm512_loadu_ps(&q_t[d * TILE]);
            for (int64_t i = 0; i < KEYS; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(k[i][d]), qd, acc[i]);
          }
          for (int64_t i = 0; i < KEYS; ++i) _mm512_storeu_ps(&scores[(j0 + i) * TILE], acc[i]);
        }
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n; ++j) top = _mm512_max_ps(top, _mm512_loadu_ps(&scores[j * TILE]));
        const __m512 scale_v = _mm512_set1_ps(c.scale), top_scaled = _mm512_mul_ps(top, scale_v);
        __m512 total = _mm512_setzero_ps();
        for (int64_t j = 0; j < padded; ++j) {  // scores become the softmax numerators in place
          __m512 p = _mm512_setzero_ps();
          if (j < n) p = exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(&scores[j * TILE]), scale_v, top_scaled));
          total = _mm512_add_ps(total, p);
          _mm512_storeu_ps(&scores[j * TILE], p);
        }
        _mm512_storeu_ps(&c.maxima[t * padded_heads + h0], top);
        _mm512_storeu_ps(&c.sums[t * padded_heads + h0], total);
        for (int64_t v0 = 0; v0 < r; v0 += VALUES) {  // out_t[v] (16 heads) = Σ_j keys[j][v] · p[j]
          __m512 acc[VALUES];
          for (int64_t i = 0; i < VALUES; ++i) acc[i] = _mm512_setzero_ps();
          for (int64_t j = 0; j < n; ++j) {
            const __m512 pj = _mm512_loadu_ps(&scores[j * TILE]);
            const float* v = keys[j] + v0;
            for (int64_t i = 0; i < VALUES; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(v[i]), pj, acc[i]);
          }
          for (int64_t i = 0; i < VALUES; ++i) _mm512_storeu_ps(&out_t[(v0 + i) * TILE], acc[i]);
        }
        float* out = &c.partial[(t * padded_heads + h0) * r];  // [16 heads][r]
        for (int64_t h = 0; h < TILE; ++h)
          for (int64_t v = 0; v < r; ++v) out[h * r + v] = out_t[v * TILE + h];
      }
    }
  });
}

}  // namespace

namespace dsv2_cpu {

template <typename T>
void latent_attention(const Attention<T>& a) {
  const int64_t B = a.B, heads = a.heads, D = a.D, S = a.S, r = a.r;
  const int64_t* slot = a.slots;
  const int64_t* length = a.lengths;
  Chunks c;
  c.slot = slot;
  c.S = S, c.heads = heads, c.D = D, c.r = r, c.row_stride = a.row_stride, c.scale = a.scale;
  c.groups = (heads + TILE - 1) / TILE;  // heads in groups of 16 (the tiles' rows, a vector's lanes)
  c.padded_heads = c.groups * TILE;
  auto& tasks = c.tasks;
  auto& first_task = c.first_task;
  first_task.resize(B + 1);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(length[b] >= 0 && length[b] <= S, "latent_attention: lengths must lie in [0, S]");
    first_task[b] = tasks.size();
    for (int64_t s = 0; s < length[b]; s += CHUNK) tasks.push_back({b, s, std::min(CHUNK, length[b] - s)});
    for (int64_t s = 0; s < length[b]; ++s)
      TORCH_CHECK(slot[b * S + s] >= 0 && slot[b * S + s] < a.num_slots, "latent_attention: slot out of range");
  }
  first_task[B] = tasks.size();
  const int64_t chunks = tasks.size(), padded_heads = c.padded_heads;
  c.maxima = scratch<float, 5>(chunks * padded_heads);
  c.sums = scratch<float, 6>(chunks * padded_heads);
  c.partial = scratch<float, 7>(chunks * padded_heads * r);
  if constexpr (std::is_same_v<T, bf16>) {
    if (amx_usable())
      attend_chunks_amx(c, a.cache, a.q);
    else
      attend_chunks(c, a.cache, a.q);
  } else {
    attend_chunks(c, a.cache, a.q);
  }
  const float* maxima = c.maxima;
  const float* sums = c.sums;
  const float* partial = c.partial;

  // merge each sequence's chunks: out = Σ_c e^(scale·(m_c − M)) o_c / Σ_c e^(scale·(m_c − M)) l_c, rounded to T
  T* o = a.out;
  at::parallel_for(0, B * heads, 16, [&](int64_t begin, int64_t end) {
    float* acc = scratch<float, 8>(r);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      if (first_task[b] == first_task[b + 1]) {  // no keys: zeros
        std::fill(o + bh * r, o + (bh + 1) * r, T(0.0f));
        continue;
      }
      float top = -INFINITY, total = 0.0f;
      for (int64_t t = first_task[b]; t < first_task[b + 1]; ++t) top = std::max(top, maxima[t * padded_heads + h]);
      std::fill(acc, acc + r, 0.0f);
      for (int64_t t = first_task[b]; t < first_task[b + 1]; ++t) {
        const float weight = std::exp(c.scale * (maxima[t * padded_heads + h] - top));
        total += weight * sums[t * padded_heads + h];
        const float* part = &partial[(t * padded_heads + h) * r];
        for (int64_t d = 0; d < r; ++d) acc[d] += weight * part[d];
      }
      for (int64_t d = 0; d < r; ++d) o[bh * r + d] = static_cast<T>(acc[d] / total);
    }
  });
}

template void latent_attention(const Attention<bf16>& a);
template void latent_attention(const Attention<float>& a);

at::Tensor latent_attention(const at::Tensor& q_in, const at::Tensor& cache, const at::Tensor& slots_in,
                            const at::Tensor& lengths_in, int64_t value_dim, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && cache.dim() == 2 && q_in.size(2) == cache.size(1),
              "latent_attention: q [B, heads, D] and a cache layer [slots, D]");
  TORCH_CHECK(slots_in.dim() == 2 && slots_in.size(0) == q_in.size(0) && lengths_in.dim() == 1 &&
                  lengths_in.size(0) == q_in.size(0),
              "latent_attention: slots [B, S] and lengths [B]");
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK((dtype == at::kBFloat16 || dtype == at::kFloat) && cache.scalar_type() == dtype &&
                  q_in.device().is_cpu() && cache.device().is_cpu(),
              "latent_attention: bfloat16 or float32 CPU tensors, q and the cache alike");
  const int64_t B = q_in.size(0), heads = q_in.size(1), D = q_in.size(2), S = slots_in.size(1), r = value_dim;
  TORCH_CHECK(D % KSTEP == 0 && r % TILE == 0 && r <= D,
              "latent_attention: the key size must be a multiple of 32 and the value size a multiple of 16, ≤ it");
  TORCH_CHECK(cache.stride(1) == 1, "latent_attention: cache rows must be contiguous");
  const auto q = q_in.contiguous(), slots = slots_in.to(at::kLong).contiguous();
  const auto lengths = lengths_in.to(at::kLong).contiguous();
  auto out = at::empty({B, heads, r}, q.options());
  if (dtype == at::kBFloat16)
    latent_attention(Attention<bf16>{q.data_ptr<bf16>(), B, heads, D, cache.data_ptr<bf16>(), cache.size(0),
                                     cache.stride(0), slots.data_ptr<int64_t>(), S, lengths.data_ptr<int64_t>(), r,
                                     static_cast<float>(scale), out.data_ptr<bf16>()});
  else
    latent_attention(Attention<float>{q.data_ptr<float>(), B, heads, D, cache.data_ptr<float>(), cache.size(0),
                                      cache.stride(0), slots.data_ptr<int64_t>(), S, lengths.data_ptr<int64_t>(), r,
                                      static_cast<float>(scale), out.data_ptr<float>()});
  return out;
}

}  // namespace dsv2_cpu

TORCH_LIBRARY_FRAGMENT(dsv2_cpu, m) {
  m.def("latent_attention(Tensor q, Tensor cache, Tensor slots, Tensor lengths, int value_dim, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv2_cpu, CPU, m) {  // the overload on tensors
  using OnTensors = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                   double);
  m.impl("latent_attention", static_cast<OnTensors>(&dsv2_cpu::latent_attention));
}
