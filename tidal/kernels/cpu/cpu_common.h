// Scalar helpers shared by the CPU kernels (paged_decode.cpp, paged_decode_bf16.h, paged_decode_quant.cpp).
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

// Each of a sequence's L tokens' cache row, walked block by block (no division per token): token t sits
// in slot tab[t / BS] * BS + t % BS; out[t] = slot * stride + offset (a KV head's row among `stride`).
inline void token_rows(const int64_t* tab, int64_t BS, int64_t L, int64_t* out, int64_t stride = 1, int64_t offset = 0) {
  for (int64_t t0 = 0, blk = 0; t0 < L; t0 += BS, ++blk)
    for (int64_t t = t0, row = tab[blk] * BS * stride + offset; t < std::min(L, t0 + BS); ++t, row += stride) out[t] = row;
}
