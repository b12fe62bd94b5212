// AVX-512 helpers shared by the CPU attention kernels (paged_decode.cpp, paged_decode_quant.cpp,
// prefill_bf16.cpp). TIDAL_AVX512 is defined where the compiler targets AVX-512 F+DQ, and
// TIDAL_AVX512_BF16 where it also has AVX512-BF16 (vdpbf16ps); both come from -march=native.
#pragma once
#include <cmath>
#include <cstdint>
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define TIDAL_AVX512 1

// exp for 16 floats: range reduction to 2^n * e^r, |r| <= ln2/2, degree-6 polynomial (rel. err ~1e-7)
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// softmax of G rows of L scores, `stride` apart
inline void softmax_rows16(float* s, int64_t G, int64_t L, int64_t stride) {
  auto mask = [L](int64_t t) { return L - t >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (L - t)) - 1); };
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * stride;
    __m512 m = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; t += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, mask(t), sg + t));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    for (int64_t t = 0; t < L; t += 16) {
      const __m512 e = _mm512_maskz_mov_ps(mask(t), exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask(t), sg + t), mx)));
      _mm512_mask_storeu_ps(sg + t, mask(t), e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t t = 0; t < L; t += 16)
      _mm512_mask_storeu_ps(sg + t, mask(t), _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(t), sg + t), inv));
  }
}

#endif

#if defined(TIDAL_AVX512) && defined(__AVX512BF16__)
#define TIDAL_AVX512_BF16 1

inline __m512 bf16_to_f32(__m256i x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}
#endif
