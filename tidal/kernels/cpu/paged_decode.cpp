// Paged decode attention for CPU: each sequence's one new query token attends to its
// context straight out of the paged KV cache, with no gathered copy of K and V.
// Parallel over (sequence, kv head); fp32 accumulation; fp32/bf16/fp16 caches.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

template <typename T>
static void decode_impl(const float* q, const T* k, const T* v, const int64_t* tables, const int64_t* lens,
                        float* out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t MB,
                        float scale) {
  const int64_t G = H / KVH;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(G * D), kf(D), vf(D);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / KVH, kh = idx % KVH, L = lens[b];
      const float* qb = q + (b * H + kh * G) * D;
      scores.assign(G * L, 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t blk = tables[b * MB + t / BS];
        const T* kp = k + ((blk * BS + t % BS) * KVH + kh) * D;
        for (int64_t d = 0; d < D; ++d) kf[d] = static_cast<float>(kp[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qb + g * D;
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
          scores[g * L + t] = s * scale;
        }
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
        const int64_t blk = tables[b * MB + t / BS];
        const T* vp = v + ((blk * BS + t % BS) * KVH + kh) * D;
        for (int64_t d = 0; d < D; ++d) vf[d] = static_cast<float>(vp[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * L + t];
          float* ag = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) ag[d] += p * vf[d];
        }
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
    decode_impl<scalar_t>(qf.data_ptr<float>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                          tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(),
                          B, H, KVH, D, BS, MB, static_cast<float>(scale));
  });
  return out.to(q.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
}
