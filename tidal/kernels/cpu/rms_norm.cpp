// RMSNorm (with the residual add) in one pass, bit-identical to the torch reference
// (kernels/torch_ops.rms_norm, which is transformers' LlamaRMSNorm arithmetic).
//
// Bit-identical matters: in bf16 a one-ulp difference somewhere in 30 layers can flip a near-tie
// greedy token (it did, on the README's chat example, with an earlier sequential-sum version).
// So the sum of squares follows ATen's CPU sum kernel order for a contiguous row
// (aten/src/ATen/native/cpu/SumKernel.cpp: 8-float vector lanes, 4 interleaved accumulators, the
// cascade levels of multi_row_sum, then a scalar tail and a lane-by-lane horizontal sum), the mean
// is that sum divided by H, and the rsqrt is 1/sqrt, each rounded in fp32 as torch rounds it.
// tests/test_cpu_fused_ops.py checks the equality bit for bit over several widths.
// Compiled without -ffast-math's reassociation and FMA contraction for exactly that reason.
#pragma GCC push_options
#pragma GCC optimize("no-fast-math", "fp-contract=off")
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include "fused_ops.h"

namespace {

constexpr int kIlp = 4, kLevels = 4;

template <int L> struct Lanes {
  float v[L] = {};
  void add(const float* b) { for (int l = 0; l < L; ++l) v[l] = v[l] + b[l]; }
  void add(const Lanes& b) { add(b.v); }
};

int64_t ceil_log2(int64_t x) { int64_t r = 0; while ((int64_t(1) << r) < x) ++r; return r; }

// ATen's row_sum over n items of L floats each (multi_row_sum's cascade levels, then its tail)
template <int L> Lanes<L> row_sum(const float* x, int64_t n) {
  const int64_t size = n / kIlp;  // rows of kIlp items
  Lanes<L> acc[kLevels][kIlp];
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / kLevels);
  const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  int64_t i = 0;
  while (i + level_step <= size) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < kIlp; ++k) acc[0][k].add(x + (i * kIlp + k) * L);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < kIlp; ++k) { acc[j][k].add(acc[j - 1][k]); acc[j - 1][k] = Lanes<L>{}; }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < kIlp; ++k) acc[0][k].add(x + (i * kIlp + k) * L);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < kIlp; ++k) acc[0][k].add(acc[j][k]);
  for (int64_t v = size * kIlp; v < n; ++v) acc[0][0].add(x + v * L);
  for (int k = 1; k < kIlp; ++k) acc[0][0].add(acc[0][k]);
  return acc[0][0];
}

// ATen's sum of a contiguous row of n floats: 8-float vectors when the row holds one, then the
// scalar tail, then the lanes one by one (vectorized_inner_sum); a shorter row sums as scalars
float aten_row_sum(const float* x, int64_t n) {
  constexpr int kLanes = 8;
  if (n < kLanes) return row_sum<1>(x, n).v[0];
  const int64_t nvec = n / kLanes;
  const Lanes<kLanes> acc = row_sum<kLanes>(x, nvec);
  float total = 0.f;
  for (int64_t t = nvec * kLanes; t < n; ++t) total = total + x[t];
  for (int l = 0; l < kLanes; ++l) total = total + acc.v[l];
  return total;
}

template <typename T> inline float rnd(float x) { return static_cast<float>(static_cast<T>(x)); }

template <typename T>
void add_rms_norm_impl(const T* x, T* residual, const T* w, T* out, int64_t rows, int64_t H, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    std::vector<float> h(H), sq(H);
    for (int64_t r = b; r < e; ++r) {
      const T* xr = x + r * H;
      T* rr = residual ? residual + r * H : nullptr;
      for (int64_t i = 0; i < H; ++i) {
        float v = static_cast<float>(xr[i]);
        if (rr) { v = rnd<T>(v + static_cast<float>(rr[i])); rr[i] = static_cast<T>(v); }
        h[i] = v;
        sq[i] = v * v;
      }
      const float var = aten_row_sum(sq.data(), H) / static_cast<float>(H);
      const float inv = 1.f / std::sqrt(var + eps);
      T* o = out + r * H;
      for (int64_t i = 0; i < H; ++i) o[i] = static_cast<T>(static_cast<float>(w[i]) * rnd<T>(h[i] * inv));
    }
  });
}

}  // namespace

torch::Tensor add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor w, double eps) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.scalar_type() == x.scalar_type(),
              "add_rms_norm: contiguous x and weight of one dtype");
  const int64_t H = x.size(-1), rows = x.numel() / H;
  auto out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    scalar_t* r = nullptr;
    if (residual.has_value()) {
      TORCH_CHECK(residual->is_contiguous() && residual->scalar_type() == x.scalar_type());
      r = residual->data_ptr<scalar_t>();
    }
    add_rms_norm_impl<scalar_t>(x.data_ptr<scalar_t>(), r, w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, H,
                                static_cast<float>(eps));
  });
  return out;
}
#pragma GCC pop_options
