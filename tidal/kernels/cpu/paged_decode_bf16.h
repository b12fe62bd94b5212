// The AVX512-BF16 paged decode attention kernel over a bf16 cache (paged_decode.cpp dispatches to it,
// for whole batches and for the fused decode step's per-thread ranges): dot products with vdpbf16ps,
// 16 tokens' scores reduced together, a vector exp, and the output accumulated in registers.
#pragma once
#include <torch/extension.h>
#include <algorithm>
#include <vector>
#include "avx512_common.h"
#include "cpu_common.h"

#ifdef TIDAL_AVX512_BF16
// v[0..15] -> one vector whose lane i is the sum of v[i]'s 16 lanes
inline __m512 reduce16(const __m512* v) {
  __m512 w[8], x[4], z[2];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88), _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

// A token's K or V row holds every KV head (the cache is [block, slot, KV head, D]). Work items run
// (sequence, KV head) in order, so the first head's pass fetches the whole row from memory (one
// contiguous read, into L2) and the later heads find their part there: three strided passes over
// DRAM read at half the bandwidth of one sequential one.
constexpr int64_t PREFETCH_AHEAD = 32;   // tokens

template <int D>
inline void prefetch_row(const char* p, int64_t kh, int64_t KVH) {
  if (kh == 0) {
    for (int64_t c = 0; c < KVH * D * 2; c += 64) _mm_prefetch(p + c, _MM_HINT_T1);
  }
  for (int c = 0; c < D * 2; c += 64) _mm_prefetch(p + c, _MM_HINT_T0);
}

// D head dim (multiple of 32), G query heads per KV head; work items [begin, end) of (sequence, KV head)
template <int D, int G>
inline void decode_bf16_range(const c10::BFloat16* q, const c10::BFloat16* k, const c10::BFloat16* v, const int64_t* tables,
                              const int64_t* lens, c10::BFloat16* out, int64_t KVH, int64_t BS, int64_t MB, float scale,
                              int64_t begin, int64_t end) {
  constexpr int NQ = D / 32;   // bf16 pair-vectors per head
  constexpr int NV = D / 16;   // fp32 vectors per head
  const int64_t H = KVH * G, row = KVH * D;
  {
    std::vector<float> scores;
    std::vector<int64_t> slot;   // each token's row in the cache (token_rows)
    Lookahead la;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / KVH, kh = idx % KVH, L = lens[b];
      la.next_seq(tables, MB, lens, BS, b, kh, KVH, end,
                  {{reinterpret_cast<const char*>(k), 2 * BS * row}, {reinterpret_cast<const char*>(v), 2 * BS * row}});
      la.pace((L + 15) / 16 + L);
      const int64_t* tab = tables + b * MB;
      slot.resize(L);
      token_rows(tab, BS, L, slot.data());
      const uint16_t* qb = reinterpret_cast<const uint16_t*>(q) + (b * H + kh * G) * D;
      __m512bh qv[G][NQ];
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < NQ; ++j) qv[g][j] = (__m512bh)_mm512_loadu_si512(qb + g * D + j * 32);
      const int64_t Lp = (L + 15) / 16 * 16;
      scores.resize(G * Lp);
      const uint16_t* kbase = reinterpret_cast<const uint16_t*>(k) + kh * D;
      // scores: 16 tokens at a time, each token's dot products reduced together
      for (int64_t t0 = 0; t0 < L; t0 += 16) {
        la.step();
        const uint16_t* kp[16];
        const int n = std::min<int64_t>(16, L - t0);
        for (int i = 0; i < 16; ++i) {
          const int64_t t = t0 + std::min(i, n - 1);
          kp[i] = kbase + slot[t] * row;
          // blocks are scattered, so the hardware prefetcher cannot guess the next tile: ask for it
          const int64_t tn = std::min(t + PREFETCH_AHEAD, L - 1);
          const char* next = reinterpret_cast<const char*>(kbase + slot[tn] * row);
          prefetch_row<D>(next, kh, KVH);
        }
        for (int g = 0; g < G; ++g) {
          __m512 acc[16];
          for (int i = 0; i < 16; ++i) {
            acc[i] = _mm512_setzero_ps();
            for (int j = 0; j < NQ; ++j)
              acc[i] = _mm512_dpbf16_ps(acc[i], qv[g][j], (__m512bh)_mm512_loadu_si512(kp[i] + j * 32));
          }
          _mm512_storeu_ps(scores.data() + g * Lp + t0, _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale)));
        }
      }
      softmax_rows16(scores.data(), G, L, Lp);  // per query head; padding lanes past L untouched
      // out = probs @ V, fp32 accumulators in registers
      __m512 acc[G][NV];
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_setzero_ps();
      const uint16_t* vbase = reinterpret_cast<const uint16_t*>(v) + kh * D;
      for (int64_t t = 0; t < L; ++t) {
        const uint16_t* vp = vbase + slot[t] * row;
        const int64_t tn = std::min(t + PREFETCH_AHEAD, L - 1);
        const char* vnext = reinterpret_cast<const char*>(vbase + slot[tn] * row);
        prefetch_row<D>(vnext, kh, KVH);
        la.step();
        __m512 vf[NV];
        for (int j = 0; j < NV; ++j) vf[j] = bf16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vp + j * 16)));
        for (int g = 0; g < G; ++g) {
          const __m512 p = _mm512_set1_ps(scores[g * Lp + t]);
          for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_fmadd_ps(p, vf[j], acc[g][j]);
        }
      }
      uint16_t* ob = reinterpret_cast<uint16_t*>(out) + (b * H + kh * G) * D;
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < NV; j += 2) {
          __m512bh pair = _mm512_cvtne2ps_pbh(acc[g][j + 1], acc[g][j]);
          _mm512_storeu_si512(ob + g * D + j * 16, (__m512i)pair);
        }
    }
  }
}
#endif
