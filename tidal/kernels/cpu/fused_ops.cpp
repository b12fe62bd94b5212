// Fused elementwise ops for the CPU backend: one pass instead of torch's 5-9 for SiLU-and-multiply
// and rotary embedding. (RMSNorm, bit-exact, is in rms_norm.cpp.) Rounding follows the torch
// reference op by op for bf16/fp16 (each intermediate the reference rounds, this rounds too), so
// results match the reference bit for bit or within one ulp.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include "fused_ops.h"

template <typename T> static inline float rnd(float x) { return static_cast<float>(static_cast<T>(x)); }

// silu(a) = a / (1 + e^-a) on n floats: a plain loop over fp32 buffers, so the compiler vectorizes
// the exp (-ffast-math, -march=native); clamped because -ffast-math assumes exp never reaches inf
static void silu_f32(const float* __restrict a, float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float e = std::exp(std::min(-a[i], 88.f));
    out[i] = a[i] < -88.f ? 0.f : a[i] / (1.f + e);   // torch: a / inf = 0 there
  }
}

// [rows, 2I] -> silu(gate) * up, [rows, I]; rounded where torch's reference rounds (silu, then the product)
torch::Tensor silu_and_mul(torch::Tensor gu) {
  TORCH_CHECK(gu.is_contiguous());
  const int64_t I = gu.size(-1) / 2, rows = gu.numel() / (2 * I);
  auto sizes = gu.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty(sizes, gu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gu.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* g = gu.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
      std::vector<float> ga(I), sa(I);
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* gr = g + r * 2 * I;
        const scalar_t* ur = gr + I;
        scalar_t* orow = o + r * I;
        for (int64_t i = 0; i < I; ++i) ga[i] = static_cast<float>(gr[i]);
        silu_f32(ga.data(), sa.data(), I);
        for (int64_t i = 0; i < I; ++i)
          orow[i] = static_cast<scalar_t>(rnd<scalar_t>(sa[i]) * static_cast<float>(ur[i]));
      }
    });
  });
  return out;
}

// In place: q [T, nh, d] and k [T, nkv, d] (rows may be strided views of a fused QKV output) rotated
// by the cos/sin tables [P, d/2] (fp32) at `positions`; NeoX rotate-half layout.
template <typename T>
static void rotate_rows(T* x, int64_t T_, int64_t nh, int64_t d, int64_t row_stride, const float* cos,
                        const float* sin, const int64_t* pos) {
  const int64_t half = d / 2;
  at::parallel_for(0, T_, 8, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* c = cos + pos[t] * half;
      const float* s = sin + pos[t] * half;
      for (int64_t h = 0; h < nh; ++h) {
        T* x1 = x + t * row_stride + h * d;
        T* x2 = x1 + half;
        for (int64_t i = 0; i < half; ++i) {
          const float ci = rnd<T>(c[i]), si = rnd<T>(s[i]);
          const float a = static_cast<float>(x1[i]), bb = static_cast<float>(x2[i]);
          x1[i] = static_cast<T>(rnd<T>(a * ci) - rnd<T>(bb * si));
          x2[i] = static_cast<T>(rnd<T>(bb * ci) + rnd<T>(a * si));
        }
      }
    }
  });
}

void rotary_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions) {
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && q.stride(1) == q.size(2) && k.stride(1) == k.size(2),
              "rotary_: heads must be contiguous within a token");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous());
  auto pos = positions.to(torch::kInt64).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_", [&] {
    rotate_rows<scalar_t>(q.data_ptr<scalar_t>(), q.size(0), q.size(1), q.size(2), q.stride(0), cos.data_ptr<float>(),
                          sin.data_ptr<float>(), pos.data_ptr<int64_t>());
    rotate_rows<scalar_t>(k.data_ptr<scalar_t>(), k.size(0), k.size(1), k.size(2), k.stride(0), cos.data_ptr<float>(),
                          sin.data_ptr<float>(), pos.data_ptr<int64_t>());
  });
}

