// Decode attention over the int8 KV cache with AVX512-VNNI (included by paged_decode_quant.cpp, which owns
// the Cache struct, the dispatch and the generic kernels).
//
// Keys: q.k = sum over groups of scale * (q . codes) + min * sum(q). Each query head is split into two
// int8 vectors (its rounding and the remainder, one scale per head), so a key's 64-byte block is two
// vpdpbusd per query head: no key is ever dequantized. Sixteen keys are transposed 4 bytes at a time, so
// the int32 lanes of one pass are the 16 keys' dot products (no horizontal sums). Values: see
// values_int8_vnni (kept out of line: a profile then splits the two passes' time).
// Needs head_dim and group size multiples of 64 (SmolLM2, Llama: head_dim 64 or 128, group 64).
#pragma once
#include <cstring>
#if defined(TIDAL_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TIDAL_AVX512_VNNI 1

constexpr int64_t PF8 = 64;  // rows prefetched ahead: a row takes a few cycles here, DRAM ~100 ns

inline float half_at(const at::Half* p, int64_t i) { return _cvtsh_ss(p[i].x); }

// Values: out_g = sum_t w_g(t) * codes_t + sum_t p_g(t) * min_t with w_g(t) = p_g(t) * scale_t, the
// weights split like the queries into hi + lo / 128 (int8 each, one scale per head and group). Four
// tokens' 64-byte blocks are transposed so each int32 lane holds one dimension of the four tokens: one
// vpdpbusd then adds four tokens' products per dimension. Lanes come out in the order
// d = 16 * (lane / 4) + 4 * k + lane % 4 for transposed vector k. Integer sums go to fp32 every 64 tokens,
// long before (hi << 7) + lo could overflow.
template <int D, int GC>
__attribute__((noinline)) void values_int8_vnni(const Cache& v, const float* p, int64_t SL, const int64_t* rows, int64_t L, int64_t GS,
                      float* out, Lookahead* la) {
  constexpr int NB = D / 64;
  constexpr int64_t FLUSH = 64;
  const int64_t NG = D / GS;
  static thread_local std::vector<int8_t> whi, wlo;
  static thread_local std::vector<float> sv, mv;
  whi.resize(GC * NG * SL), wlo.resize(GC * NG * SL), sv.resize(SL), mv.resize(SL);
  float sw[GC][NB], msum[GC][NB];
  for (int64_t j = 0; j < NG; ++j) {
    for (int64_t t = 0; t < L; ++t) {
      const int64_t r = rows[t] * v.ng + j;
      sv[t] = half_at(v.scale, r), mv[t] = half_at(v.min, r);
    }
    for (int64_t t = L; t < SL; ++t) sv[t] = mv[t] = 0.f;  // padding: weight 0
    for (int g = 0; g < GC; ++g) {
      const float* pg = p + g * SL;
      __m512 mx = _mm512_setzero_ps(), ms = _mm512_setzero_ps();
      for (int64_t t = 0; t < SL; t += 16) {
        const __mmask16 in = SL - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (SL - t)) - 1);
        const __m512 pt = _mm512_maskz_loadu_ps(in, pg + t);
        mx = _mm512_max_ps(mx, _mm512_mul_ps(pt, _mm512_maskz_loadu_ps(in, sv.data() + t)));
        ms = _mm512_fmadd_ps(pt, _mm512_maskz_loadu_ps(in, mv.data() + t), ms);
      }
      const float m = _mm512_reduce_max_ps(mx), inv = m > 0.f ? 127.f / m : 0.f;
      sw[g][j] = m / 127.f / 128.f, msum[g][j] = _mm512_reduce_add_ps(ms);
      int8_t *hi = whi.data() + (g * NG + j) * SL, *lo = wlo.data() + (g * NG + j) * SL;
      for (int64_t t = 0; t < SL; t += 16) {
        const __mmask16 in = SL - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (SL - t)) - 1);
        const __m512 x = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(in, pg + t), _mm512_maskz_loadu_ps(in, sv.data() + t)),
                                       _mm512_set1_ps(inv));
        const __m512 h = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(x, h), _mm512_set1_ps(128.f)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm512_mask_cvtepi32_storeu_epi8(hi + t, in, _mm512_cvtps_epi32(h));
        _mm512_mask_cvtepi32_storeu_epi8(lo + t, in, _mm512_cvtps_epi32(l));
      }
    }
  }
  alignas(64) float accf[GC][NB][4][16] = {};
  for (int blk = 0; blk < NB; ++blk) {
    const int64_t j = 64 * blk / GS;
    __m512i hi[GC][4], lo[GC][4];
    auto flush = [&] {
      for (int g = 0; g < GC; ++g)
        for (int k = 0; k < 4; ++k) {
          const __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(hi[g][k], 7), lo[g][k]));
          _mm512_store_ps(accf[g][blk][k], _mm512_fmadd_ps(f, _mm512_set1_ps(sw[g][j]), _mm512_load_ps(accf[g][blk][k])));
          hi[g][k] = lo[g][k] = _mm512_setzero_si512();
        }
    };
    for (int g = 0; g < GC; ++g)
      for (int k = 0; k < 4; ++k) hi[g][k] = lo[g][k] = _mm512_setzero_si512();
    for (int64_t t = 0; t < L; t += 4) {
      __m512i x[4];
      for (int i = 0; i < 4; ++i) {
        if (t + i + PF8 < L) __builtin_prefetch(v.codes + rows[t + i + PF8] * v.dq + 64 * blk);
        x[i] = _mm512_loadu_si512(v.codes + rows[std::min(t + i, L - 1)] * v.dq + 64 * blk);  // pad: weight 0
      }
      const __m512i a = _mm512_unpacklo_epi8(x[0], x[1]), b = _mm512_unpackhi_epi8(x[0], x[1]);
      const __m512i c = _mm512_unpacklo_epi8(x[2], x[3]), d = _mm512_unpackhi_epi8(x[2], x[3]);
      const __m512i y[4] = {_mm512_unpacklo_epi16(a, c), _mm512_unpackhi_epi16(a, c), _mm512_unpacklo_epi16(b, d),
                            _mm512_unpackhi_epi16(b, d)};
      for (int g = 0; g < GC; ++g) {
        int32_t h4, l4;
        std::memcpy(&h4, whi.data() + (g * NG + j) * SL + t, 4), std::memcpy(&l4, wlo.data() + (g * NG + j) * SL + t, 4);
        const __m512i wh = _mm512_set1_epi32(h4), wl = _mm512_set1_epi32(l4);
        for (int k = 0; k < 4; ++k) {
          hi[g][k] = _mm512_dpbusd_epi32(hi[g][k], y[k], wh);
          lo[g][k] = _mm512_dpbusd_epi32(lo[g][k], y[k], wl);
        }
      }
      if (la) la->step();
      if ((t + 4) % FLUSH == 0) flush();
    }
    flush();
  }
  for (int g = 0; g < GC; ++g)
    for (int blk = 0; blk < NB; ++blk) {
      const float m = msum[g][64 * blk / GS];  // GS is a multiple of 64 (no division per lane: idiv showed up)
      for (int k = 0; k < 4; ++k)
        for (int i = 0; i < 16; ++i) out[g * D + 64 * blk + 16 * (i / 4) + 4 * k + i % 4] = accf[g][blk][k][i] + m;
    }
}

template <int D, int GC>
void attend_int8_vnni(const Cache& k, const Cache& v, const float* qs, const int64_t* rows, int64_t L, int64_t GS,
                      std::vector<float>& scores, float* out, Lookahead* la) {
  const int64_t NG = D / GS;
  constexpr int NB = D / 64;
  if (la) la->pace((L + 15) / 16 + NB * (L + 3) / 4);
  // q ~ sq * (hi + lo / 128): hi the int8 rounding, lo its remainder (|lo| <= 64), so q's rounding error
  // is 1/256 of a step of hi (hi alone moved outputs by ~1% on keys with large channel offsets)
  alignas(64) int8_t qhi[GC][D], qlo[GC][D];
  float sq[GC], qsum[GC][D / 64];
  for (int g = 0; g < GC; ++g) {
    float amax = 0.f;
    for (int d = 0; d < D; ++d) amax = std::max(amax, std::fabs(qs[g * D + d]));
    sq[g] = amax / 127.f / 128.f;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int d = 0; d < D; ++d) {
      const float x = qs[g * D + d] * inv, hi = std::nearbyint(x);
      qhi[g][d] = static_cast<int8_t>(hi);
      qlo[g][d] = static_cast<int8_t>(std::nearbyint((x - hi) * 128.f));
    }
    for (int64_t j = 0; j < NG; ++j) {
      float s = 0.f;
      for (int64_t d = j * GS; d < (j + 1) * GS; ++d) s += qs[g * D + d];
      qsum[g][j] = s;
    }
  }
  // qt[g][blk][e]: 128-bit lane l holds dword 4l + e of block blk of the head's rounding (and its remainder),
  // four times, to meet the keys transposed by keys16 below
  alignas(64) int32_t qth[GC][NB][4][16], qtl[GC][NB][4][16];
  for (int g = 0; g < GC; ++g)
    for (int blk = 0; blk < NB; ++blk)
      for (int e = 0; e < 4; ++e)
        for (int i = 0; i < 16; ++i) {
          std::memcpy(&qth[g][blk][e][i], qhi[g] + 64 * blk + 4 * (4 * (i / 4) + e), 4);
          std::memcpy(&qtl[g][blk][e][i], qlo[g] + 64 * blk + 4 * (4 * (i / 4) + e), 4);
        }
  const int64_t SL = (L + 15) / 16 * 16;
  scores.resize(GC * SL);
  alignas(32) uint16_t sh[16], mh[16];
  for (int64_t t = 0; t < L; t += 16) {
    const uint8_t* r[16];
    for (int i = 0; i < 16; ++i) {
      const int64_t row = rows[std::min(t + i, L - 1)];  // past the end: the last key again, its score unused
      r[i] = k.codes + row * k.dq;
      if (t + i + PF8 < L) {  // into L1 (Lookahead brought the blocks to L2); scales and mins (2 bytes a
        // row, a block's heads side by side) every 8th token: per token they were 5% of this kernel's time
        const int64_t pr = rows[t + i + PF8];
        for (int64_t o = 0; o < k.dq; o += 64) __builtin_prefetch(k.codes + pr * k.dq + o);
        if (i % 8 == 0) __builtin_prefetch(k.scale + pr * k.ng), __builtin_prefetch(k.min + pr * k.ng);
      }
    }
    if (la) la->step();
    __m512 sc[GC];
    for (int g = 0; g < GC; ++g) sc[g] = _mm512_setzero_ps();
    for (int blk = 0; blk < NB; ++blk) {
      const int64_t j = 64 * blk / GS;
      for (int i = 0; i < 16; ++i) {
        const int64_t row = rows[std::min(t + i, L - 1)] * k.ng + j;
        sh[i] = k.scale[row].x, mh[i] = k.min[row].x;
      }
      const __m512 s16 = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(sh)));
      const __m512 m16 = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(mh)));
      // x[m][e]: 128-bit lane l holds dword 4l + e of keys 4m .. 4m + 3
      __m512i x[4][4];
      for (int m = 0; m < 4; ++m) {
        __m512i y[4];
        for (int i = 0; i < 4; ++i) y[i] = _mm512_loadu_si512(r[4 * m + i] + 64 * blk);
        const __m512i a0 = _mm512_unpacklo_epi32(y[0], y[1]), a1 = _mm512_unpacklo_epi32(y[2], y[3]);
        const __m512i b0 = _mm512_unpackhi_epi32(y[0], y[1]), b1 = _mm512_unpackhi_epi32(y[2], y[3]);
        x[m][0] = _mm512_unpacklo_epi64(a0, a1), x[m][1] = _mm512_unpackhi_epi64(a0, a1);
        x[m][2] = _mm512_unpacklo_epi64(b0, b1), x[m][3] = _mm512_unpackhi_epi64(b0, b1);
      }
      for (int g = 0; g < GC; ++g) {
        __m512i acc[4];
        for (int m = 0; m < 4; ++m) {
          __m512i hi = _mm512_setzero_si512(), lo = _mm512_setzero_si512();
          for (int e = 0; e < 4; ++e) {
            hi = _mm512_dpbusd_epi32(hi, x[m][e], _mm512_load_si512(qth[g][blk][e]));
            lo = _mm512_dpbusd_epi32(lo, x[m][e], _mm512_load_si512(qtl[g][blk][e]));
          }
          acc[m] = _mm512_add_epi32(_mm512_slli_epi32(hi, 7), lo);
        }
        // lane sums of acc[m] -> key 4m + p at position 4m + p
        const __m512i s01 = _mm512_add_epi32(_mm512_shuffle_i32x4(acc[0], acc[1], 0x44), _mm512_shuffle_i32x4(acc[0], acc[1], 0xEE));
        const __m512i s23 = _mm512_add_epi32(_mm512_shuffle_i32x4(acc[2], acc[3], 0x44), _mm512_shuffle_i32x4(acc[2], acc[3], 0xEE));
        const __m512i dot = _mm512_add_epi32(_mm512_shuffle_i32x4(s01, s23, 0x88), _mm512_shuffle_i32x4(s01, s23, 0xDD));
        sc[g] = _mm512_fmadd_ps(_mm512_mul_ps(s16, _mm512_set1_ps(sq[g])), _mm512_cvtepi32_ps(dot), sc[g]);
        if ((64 * blk) % GS == 0) sc[g] = _mm512_fmadd_ps(m16, _mm512_set1_ps(qsum[g][j]), sc[g]);
      }
    }
    for (int g = 0; g < GC; ++g) _mm512_storeu_ps(scores.data() + g * SL + t, sc[g]);
  }
  softmax_rows16(scores.data(), GC, L, SL);
  for (int g = 0; g < GC; ++g) std::fill(scores.data() + g * SL + L, scores.data() + (g + 1) * SL, 0.f);
  values_int8_vnni<D, GC>(v, scores.data(), SL, rows, L, GS, out, la);
}

// attend_int8_vnni with the query heads per KV head (1..8) as a compile-time constant
template <int D, int GC = 1>
void int8_by_heads(int64_t G, const Cache& k, const Cache& v, const float* qs, const int64_t* rows, int64_t L,
                   int64_t GS, std::vector<float>& scores, float* out, Lookahead* la) {
  if constexpr (GC < 8) {
    if (G != GC) return int8_by_heads<D, GC + 1>(G, k, v, qs, rows, L, GS, scores, out, la);
  }
  attend_int8_vnni<D, GC>(k, v, qs, rows, L, GS, scores, out, la);
}
#endif
