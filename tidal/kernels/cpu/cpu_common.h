// Scalar helpers shared by the CPU kernels (paged_decode.cpp, paged_decode_quant.cpp).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

// In place, each of G rows of L scores -> its softmax (max-subtracted, fp32).
inline void softmax_rows(float* s, int64_t G, int64_t L) {
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * L;
    float mx = -INFINITY;
    for (int64_t t = 0; t < L; ++t) mx = std::max(mx, sg[t]);
    float sum = 0.f;
    for (int64_t t = 0; t < L; ++t) { sg[t] = std::exp(sg[t] - mx); sum += sg[t]; }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < L; ++t) sg[t] *= inv;
  }
}
