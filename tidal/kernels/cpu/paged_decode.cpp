// Paged decode attention for CPU: each sequence's one new query token attends to its
// context straight out of the paged KV cache, with no gathered copy of K and V.
// Parallel over (sequence, kv head); fp32 accumulation; fp32/bf16/fp16 caches.
// Head sizes 64 and 128 get compile-time loops (the compiler vectorizes them fully).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// Widen D cache elements to fp32. bf16 is a plain 16-bit shift written so it vectorizes.
template <int D>
static inline void to_float(const float* __restrict src, float* __restrict dst, int64_t n) {
  std::memcpy(dst, src, (D > 0 ? D : n) * sizeof(float));
}
template <int D>
static inline void to_float(const c10::BFloat16* __restrict src, float* __restrict dst, int64_t n) {
  const uint16_t* __restrict s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* __restrict d32 = reinterpret_cast<uint32_t*>(dst);
  const int64_t m = D > 0 ? D : n;
  for (int64_t d = 0; d < m; ++d) d32[d] = static_cast<uint32_t>(s[d]) << 16;
}
template <int D>
static inline void to_float(const c10::Half* __restrict src, float* __restrict dst, int64_t n) {
  const int64_t m = D > 0 ? D : n;
  for (int64_t d = 0; d < m; ++d) dst[d] = static_cast<float>(src[d]);
}

template <int D>
static inline void to_float(const double* __restrict src, float* __restrict dst, int64_t n) {
  const int64_t m = D > 0 ? D : n;
  for (int64_t d = 0; d < m; ++d) dst[d] = static_cast<float>(src[d]);
}

template <int D>
static inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  const int64_t m = D > 0 ? D : n;
  float s = 0.f;
  for (int64_t d = 0; d < m; ++d) s += a[d] * b[d];
  return s;
}

template <int D>
static inline void axpy(float p, const float* __restrict x, float* __restrict y, int64_t n) {
  const int64_t m = D > 0 ? D : n;
  for (int64_t d = 0; d < m; ++d) y[d] += p * x[d];
}

template <typename T, int DC>
static void decode_impl(const float* q, const T* k, const T* v, const int64_t* tables, const int64_t* lens,
                        float* out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t MB,
                        float scale) {
  const int64_t G = H / KVH;
  const int64_t row = KVH * D;  // elements between consecutive tokens of one head
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(G * D), kf(D), qs(G * D);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / KVH, kh = idx % KVH, L = lens[b];
      const float* qb = q + (b * H + kh * G) * D;
      for (int64_t i = 0; i < G * D; ++i) qs[i] = qb[i] * scale;
      scores.resize(G * L);
      for (int64_t t = 0; t < L; ++t) {
        const T* kp = k + (tables[b * MB + t / BS] * BS + t % BS) * row + kh * D;
        to_float<DC>(kp, kf.data(), D);
        for (int64_t g = 0; g < G; ++g) scores[g * L + t] = dot<DC>(qs.data() + g * D, kf.data(), D);
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * L;
        float m = -INFINITY;
        for (int64_t t = 0; t < L; ++t) m = std::max(m, sg[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < L; ++t) { sg[t] = std::exp(sg[t] - m); sum += sg[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < L; ++t) sg[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const T* vp = v + (tables[b * MB + t / BS] * BS + t % BS) * row + kh * D;
        to_float<DC>(vp, kf.data(), D);
        for (int64_t g = 0; g < G; ++g) axpy<DC>(scores[g * L + t], kf.data(), acc.data() + g * D, D);
      }
      std::copy(acc.begin(), acc.end(), out + (b * H + kh * G) * D);
    }
  });
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV cache must be contiguous");
  auto qf = q.to(torch::kFloat32).contiguous();
  auto tables = block_tables.to(torch::kInt64).contiguous();
  auto lens = seq_lens.to(torch::kInt64).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2), MB = tables.size(1);
  auto out = torch::empty({B, H, D}, qf.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "paged_decode", [&] {
    auto run = [&](auto dc) {
      decode_impl<scalar_t, decltype(dc)::value>(
          qf.data_ptr<float>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
          tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(),
          B, H, KVH, D, BS, MB, static_cast<float>(scale));
    };
    if (D == 64) run(std::integral_constant<int, 64>{});
    else if (D == 128) run(std::integral_constant<int, 128>{});
    else run(std::integral_constant<int, 0>{});
  });
  return out.to(q.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
}
