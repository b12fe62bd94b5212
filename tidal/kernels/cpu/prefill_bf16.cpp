// Causal prefill attention for one sequence over a bf16 paged KV cache, with AVX512-BF16.
//
// The torch path (kernels/torch_ops.prefill_attention) spends most of its time in fp32 matmuls on
// small blocks and in the ops around them (~80 GFLOP/s here). This kernel:
//  - packs the sequence's K and V once per call out of the paged cache into the pair-interleaved
//    layouts vdpbf16ps wants (K: 32-key tiles [D/2][32][2]; V: key pairs [S/2][D][2]);
//  - per (KV head, block of 32 query positions), computes fp32 scores for all G query heads of that
//    KV head only up to the block's last position (the causally masked rest is never computed),
//    with 4 query rows x 32 keys per register tile;
//  - normalizes each row in fp32 over exactly its own keys, rounds the probabilities to bf16 (as
//    the torch path's probs.to(v.dtype)), and multiplies by V with fp32 accumulators, 4 rows x 64
//    dims per tile; one bf16 rounding of the output.
// Work items are handed out dynamically: causal blocks late in the prompt cost more than early ones.
// tests/test_cpu_prefill.py compares it with the torch path.
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#include "avx512_common.h"
#include "fused_ops.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef TIDAL_AVX512_BF16
namespace {

constexpr int KT = 32;  // keys per score tile (two vectors of 16)
constexpr int QB = 32;  // query positions per work item
constexpr int RT = 4;   // query rows per register tile

// K of one KV head -> [S/32][D/2][32][2] (pairs of dims, 32 keys per tile), zero past S
void pack_k(const uint16_t* src, int64_t row, const int64_t* tab, int64_t BS, int64_t S, int64_t Sp, int D,
            uint16_t* dst) {
  std::memset(dst, 0, sizeof(uint16_t) * Sp * D);
  for (int64_t t = 0; t < S; ++t) {
    const uint16_t* k = src + (tab[t / BS] * BS + t % BS) * row;
    uint16_t* tile = dst + (t / KT) * KT * D + (t % KT) * 2;
    for (int dp = 0; dp < D / 2; ++dp) {
      tile[dp * KT * 2] = k[2 * dp];
      tile[dp * KT * 2 + 1] = k[2 * dp + 1];
    }
  }
}

// V of one KV head -> [S/2][D][2] (pairs of keys), zero past S
void pack_v(const uint16_t* src, int64_t row, const int64_t* tab, int64_t BS, int64_t S, int64_t Sp, int D,
            uint16_t* dst) {
  std::memset(dst, 0, sizeof(uint16_t) * Sp * D);
  for (int64_t t = 0; t < S; ++t) {
    const uint16_t* v = src + (tab[t / BS] * BS + t % BS) * row;
    uint16_t* pair = dst + (t / 2) * D * 2 + (t % 2);
    for (int d = 0; d < D; ++d) pair[2 * d] = v[d];
  }
}

// scores[r][key0 .. key0+32) = scale * q_r . k for R rows
template <int R>
inline void qk_tile(const uint32_t* const* q, const uint16_t* ktile, int D, float scale, float* const* s) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int dp = 0; dp < D / 2; ++dp) {
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(ktile + dp * KT * 2);
    const __m512bh k1 = (__m512bh)_mm512_loadu_si512(ktile + dp * KT * 2 + 32);
    for (int r = 0; r < R; ++r) {
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r][dp]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qb, k0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qb, k1);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(s[r], _mm512_mul_ps(acc[r][0], sc));
    _mm512_storeu_ps(s[r] + 16, _mm512_mul_ps(acc[r][1], sc));
  }
}

// out[r][d0 .. d0+64) = sum over key pairs of p_r . v for R rows (p: bf16 rows, read as pairs)
template <int R>
inline void pv_tile(const uint32_t* const* p, const uint16_t* vp, int64_t npairs, int D, int d0, uint16_t* const* out) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < npairs; ++j) {
    const uint16_t* vj = vp + j * D * 2 + d0 * 2;
    __m512bh v[4];
    for (int c = 0; c < 4; ++c) v[c] = (__m512bh)_mm512_loadu_si512(vj + c * 32);
    for (int r = 0; r < R; ++r) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r][j]));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, v[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r] + d0 + c * 16), (__m256i)_mm512_cvtneps_pbh(acc[r][c]));
}

template <int R, typename F>
inline void dispatch_rows(int n, F&& f) {
  if constexpr (R > 0) {
    if (n == R) return f(std::integral_constant<int, R>{});
    dispatch_rows<R - 1>(n, f);
  }
}

}  // namespace

// q [L, H, D] bf16 (rows may be strided), caches [blocks, BS, KVH, D] bf16; the L new tokens are
// positions S-L .. S-1 of the sequence. Returns [L, H, D] bf16, or an undefined tensor when this
// kernel does not handle the case (the caller then takes the torch path).
torch::Tensor prefill_attention_bf16(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_table, int64_t S, double scale) {
  const int64_t L = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2);
  if (q.scalar_type() != at::kBFloat16 || k_cache.scalar_type() != at::kBFloat16 ||
      v_cache.scalar_type() != at::kBFloat16 || D % 64 != 0 || q.stride(2) != 1 || q.stride(1) != D ||
      !k_cache.is_contiguous() || !v_cache.is_contiguous() || H % KVH != 0 || L > S)
    return torch::Tensor();
  const int64_t G = H / KVH, Sp = (S + KT - 1) / KT * KT, row = KVH * D, qs = q.stride(0);
  auto tab_t = block_table.to(torch::kInt64).contiguous();
  const int64_t* tab = tab_t.data_ptr<int64_t>();
  const uint16_t* kc = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const uint16_t* vc = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  const uint16_t* qd = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  auto out = torch::empty({L, H, D}, q.options());
  uint16_t* od = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  std::vector<uint16_t> kp(KVH * Sp * D), vp(KVH * Sp * D);
  const int64_t nblk = (L + QB - 1) / QB, items = KVH * nblk;
  const int threads = std::max<int>(1, at::get_num_threads());
  const float sc = static_cast<float>(scale);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t h = 0; h < 2 * KVH; ++h) {
      const int64_t kh = h % KVH;
      if (h < KVH) pack_k(kc + kh * D, row, tab, BS, S, Sp, D, kp.data() + kh * Sp * D);
      else pack_v(vc + kh * D, row, tab, BS, S, Sp, D, vp.data() + kh * Sp * D);
    }
    std::vector<float> scores(G * QB * Sp);
    std::vector<uint16_t> probs(G * QB * Sp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t kh = it % KVH, blk = nblk - 1 - it / KVH;   // the costly late blocks first
      const int64_t a = blk * QB, b = std::min(L, a + QB), nq = b - a;
      const int64_t keys = S - L + b, ktiles = (keys + KT - 1) / KT, kpad = ktiles * KT;
      const int64_t nrows = G * nq;
      auto qrow = [&](int64_t r) {  // row r = (query head g, position a + i)
        return reinterpret_cast<const uint32_t*>(qd + (a + r % nq) * qs + (kh * G + r / nq) * D);
      };
      for (int64_t r0 = 0; r0 < nrows; r0 += RT) {
        const int n = static_cast<int>(std::min<int64_t>(RT, nrows - r0));
        const uint32_t* qr[RT];
        float* sr[RT];
        for (int r = 0; r < n; ++r) { qr[r] = qrow(r0 + r); sr[r] = scores.data() + (r0 + r) * kpad; }
        dispatch_rows<RT>(n, [&](auto R) {
          float* st[RT];
          for (int64_t t = 0; t < ktiles; ++t) {
            for (int r = 0; r < n; ++r) st[r] = sr[r] + t * KT;
            qk_tile<decltype(R)::value>(qr, kp.data() + kh * Sp * D + t * KT * D, static_cast<int>(D), sc, st);
          }
        });
      }
      for (int64_t r = 0; r < nrows; ++r) {  // each row over its own keys: position a+i sees S-L+a+i+1
        const int64_t own = S - L + a + r % nq + 1;
        float* s = scores.data() + r * kpad;
        softmax_rows16(s, 1, own, kpad);
        uint16_t* p = probs.data() + r * kpad;
        int64_t t = 0;
        for (; t + 16 <= own; t += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + t), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + t)));
        for (; t < own; ++t) p[t] = c10::BFloat16(s[t]).x;
        for (; t < kpad; ++t) p[t] = 0;
      }
      for (int64_t r0 = 0; r0 < nrows; r0 += RT) {
        const int n = static_cast<int>(std::min<int64_t>(RT, nrows - r0));
        const uint32_t* pr[RT];
        uint16_t* orow[RT];
        for (int r = 0; r < n; ++r) {
          const int64_t rr = r0 + r;
          pr[r] = reinterpret_cast<const uint32_t*>(probs.data() + rr * kpad);
          orow[r] = od + ((a + rr % nq) * H + kh * G + rr / nq) * D;
        }
        dispatch_rows<RT>(n, [&](auto R) {
          for (int d0 = 0; d0 < D; d0 += 64)
            pv_tile<decltype(R)::value>(pr, vp.data() + kh * Sp * D, kpad / 2,
                                        static_cast<int>(D), d0, orow);
        });
      }
    }
  }
  return out;
}
#else
torch::Tensor prefill_attention_bf16(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, double) {
  return torch::Tensor();
}
#endif
