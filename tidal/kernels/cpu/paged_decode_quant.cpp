// Paged decode attention over a group-wise int8 / int4 KV cache (kv/quant_cache.py's layout):
// codes uint8 [blocks, block_size, kv_heads, D * bits / 8], scale and min fp16 [..., D / group].
// Each K/V row is dequantized on the fly (x = scale * q + min, as weights/quant.py's dequantize)
// while it is read; no dequantized copy of the cache is made. Parallel over (sequence, kv head),
// fp32 math. Separate from paged_decode.cpp (the float caches' kernel, tuned on its own); registered
// as torch.ops.tidal_kv.paged_decode_quant.
//
// Rows of one sequence sit in scattered blocks, so the hardware prefetcher stalls at every block
// edge; prefetching PF rows ahead made this kernel 2x faster (B=64, 450 tokens, 12 layers' caches).
// With AVX-512 (head size 64 or 128, up to 8 query heads per KV head): four keys' dot products are
// reduced together (hsum4), exp is vectorized, and the output accumulates in registers. Measured at
// B=64, 450 tokens, 9/3 heads, d=64, one thread: int8 2.4-2.7 ms a layer, int4 2.3-2.5, against 3.9
// for the bf16 cache's AVX512-BF16 kernel (bench/kv_decode_attention.py). On a VNNI CPU the int8 cache
// (head size and group multiples of 64) takes paged_decode_int8.h's kernel instead, which never
// dequantizes a key; TIDAL_KV_VNNI=0 keeps it here.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>
#include "cpu_common.h"
#include "avx512_common.h"

namespace {

constexpr int64_t PF = 16;  // rows prefetched ahead

// TIDAL_KV_VNNI=0 keeps the int8 cache on the dequantizing kernel (for comparisons)
bool vnni_enabled() {
  static const bool on = [] { const char* e = std::getenv("TIDAL_KV_VNNI"); return !e || std::string(e) != "0"; }();
  return on;
}

struct Cache {  // one of K or V; row r = (slot * kv_heads + head)
  const uint8_t* codes;
  const at::Half *scale, *min;
  int64_t dq, ng;  // bytes and groups per row
  inline void prefetch(int64_t r) const {
    for (int64_t o = 0; o < dq; o += 64) __builtin_prefetch(codes + r * dq + o);
    __builtin_prefetch(scale + r * ng), __builtin_prefetch(min + r * ng);
  }
};

// Row r -> D floats. Int4: byte e of a group holds value e (low nibble) and value e + GS/2 (high).
template <int BITS>
inline void dequant_row(const Cache& c, int64_t r, float* __restrict out, int64_t D, int64_t GS) {
  const uint8_t* __restrict q = c.codes + r * c.dq;
  for (int64_t g0 = 0, j = 0; g0 < D; g0 += GS, ++j) {
    const float sc = static_cast<float>(c.scale[r * c.ng + j]), mn = static_cast<float>(c.min[r * c.ng + j]);
    if (BITS == 8) {
      for (int64_t e = 0; e < GS; ++e) out[g0 + e] = static_cast<float>(q[g0 + e]) * sc + mn;
    } else {
      const uint8_t* __restrict qg = q + g0 / 2;
      const int64_t h = GS / 2;
      for (int64_t e = 0; e < h; ++e) {
        out[g0 + e] = static_cast<float>(qg[e] & 15) * sc + mn;
        out[g0 + h + e] = static_cast<float>(qg[e] >> 4) * sc + mn;
      }
    }
  }
}


// One (sequence, kv head): qs [G, D] pre-scaled queries, rows [L] cache row of each token -> out [G, D].
template <int BITS>
void attend_generic(const Cache& k, const Cache& v, const float* qs, const int64_t* rows, int64_t L,
                    int64_t G, int64_t D, int64_t GS, std::vector<float>& scores, float* out) {
  std::vector<float> x(D);
  for (int64_t t = 0; t < L; ++t) {
    if (t + PF < L) k.prefetch(rows[t + PF]);
    dequant_row<BITS>(k, rows[t], x.data(), D, GS);
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += qs[g * D + d] * x[d];
      scores[g * L + t] = s;
    }
  }
  softmax_rows(scores.data(), G, L);
  std::fill(out, out + G * D, 0.f);
  for (int64_t t = 0; t < L; ++t) {
    if (t + PF < L) v.prefetch(rows[t + PF]);
    dequant_row<BITS>(v, rows[t], x.data(), D, GS);
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * L + t];
      for (int64_t d = 0; d < D; ++d) out[g * D + d] += p * x[d];
    }
  }
}

#ifdef TIDAL_AVX512
// 16 values (chunk c of row r), dequantized. Needs GS % 16 == 0 (int8) or GS % 32 == 0 (int4).
template <int BITS>
inline __m512 load16(const Cache& k, int64_t r, int64_t c, int64_t GS) {
  const int64_t e = 16 * c, j = e / GS, e0 = e - j * GS;
  const uint8_t* row = k.codes + r * k.dq;
  __m512i v;
  if (BITS == 8) {
    v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + e)));
  } else {
    const int64_t h = GS / 2;
    v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j * h + (e0 < h ? e0 : e0 - h))));
    v = e0 < h ? _mm512_and_si512(v, _mm512_set1_epi32(15)) : _mm512_srli_epi32(v, 4);
  }
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(static_cast<float>(k.scale[r * k.ng + j])),
                         _mm512_set1_ps(static_cast<float>(k.min[r * k.ng + j])));
}

// [sum of a's lanes, b's, c's, d's]
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

template <int BITS, int D, int GC>
void attend_avx512(const Cache& k, const Cache& v, const float* qs, const int64_t* rows, int64_t L,
                   int64_t GS, std::vector<float>& scores, float* out, Lookahead* la) {
  constexpr int NC = D / 16;
  const int64_t SL = (L + 3) / 4 * 4;  // scores of one head, padded so 4 always fit
  scores.resize(GC * SL);
  if (la) la->pace((L + 3) / 4 + L);
  for (int64_t t = 0; t < L; t += 4) {
    if (la) la->step();
    const int n = static_cast<int>(std::min<int64_t>(4, L - t));
    __m512 x[4][NC];
    for (int i = 0; i < 4; ++i) {
      if (t + i + PF < L) k.prefetch(rows[t + i + PF]);
      for (int c = 0; c < NC; ++c) x[i][c] = i < n ? load16<BITS>(k, rows[t + i], c, GS) : _mm512_setzero_ps();
    }
    for (int g = 0; g < GC; ++g) {
      __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int c = 0; c < NC; ++c) {
        const __m512 qc = _mm512_loadu_ps(qs + g * D + 16 * c);
        for (int i = 0; i < 4; ++i) a[i] = _mm512_fmadd_ps(qc, x[i][c], a[i]);
      }
      _mm_storeu_ps(scores.data() + g * SL + t, hsum4(a[0], a[1], a[2], a[3]));
    }
  }
  softmax_rows16(scores.data(), GC, L, SL);
  __m512 acc[GC][NC];
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    if (t + PF < L) v.prefetch(rows[t + PF]);
    if (la) la->step();
    __m512 x[NC];
    for (int c = 0; c < NC; ++c) x[c] = load16<BITS>(v, rows[t], c, GS);
    for (int g = 0; g < GC; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * SL + t]);
      for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_fmadd_ps(p, x[c], acc[g][c]);
    }
  }
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(out + g * D + 16 * c, acc[g][c]);
}

// attend_avx512 with the query heads per KV head (1..8) as a compile-time constant
template <int BITS, int D, int GC = 1>
void by_heads(int64_t G, const Cache& k, const Cache& v, const float* qs, const int64_t* rows, int64_t L,
              int64_t GS, std::vector<float>& scores, float* out, Lookahead* la) {
  if constexpr (GC < 8) {
    if (G != GC) return by_heads<BITS, D, GC + 1>(G, k, v, qs, rows, L, GS, scores, out, la);
  }
  attend_avx512<BITS, D, GC>(k, v, qs, rows, L, GS, scores, out, la);
}
#include "paged_decode_int8.h"
#endif

at::Tensor paged_decode_quant(at::Tensor q, at::Tensor k_data, at::Tensor k_scale, at::Tensor k_min,
                              at::Tensor v_data, at::Tensor v_scale, at::Tensor v_min, at::Tensor block_tables,
                              at::Tensor seq_lens, double scale, int64_t bits, int64_t group_size) {
  for (const auto& t : {k_data, k_scale, k_min, v_data, v_scale, v_min})
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "quantized KV cache must be contiguous CPU tensors");
  TORCH_CHECK(k_data.scalar_type() == at::kByte && v_data.scalar_type() == at::kByte && k_scale.scalar_type() == at::kHalf &&
              k_min.scalar_type() == at::kHalf && v_scale.scalar_type() == at::kHalf && v_min.scalar_type() == at::kHalf,
              "KV codes must be uint8, their scales and mins fp16");
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  auto qf = q.to(at::kFloat).contiguous();
  auto tables = block_tables.to(at::kLong).contiguous();
  auto lens = seq_lens.to(at::kLong).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), GS = group_size;
  const int64_t BS = k_data.size(1), KVH = k_data.size(2), MB = tables.size(1), G = H / KVH;
  TORCH_CHECK(k_data.size(3) * 8 / bits == D && GS > 0 && GS % 2 == 0 && D % GS == 0 && k_scale.size(3) == D / GS,
              "KV cache shape does not match the head size and group size");
  auto cache = [&](const at::Tensor& c, const at::Tensor& s, const at::Tensor& m) {
    return Cache{c.data_ptr<uint8_t>(), s.data_ptr<at::Half>(), m.data_ptr<at::Half>(), D * bits / 8, D / GS};
  };
  const Cache kc = cache(k_data, k_scale, k_min), vc = cache(v_data, v_scale, v_min);
  auto out = at::empty({B, H, D}, qf.options());
  const float *qp = qf.data_ptr<float>(), sc = static_cast<float>(scale);
  const int64_t *tp = tables.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
#ifdef TIDAL_AVX512
  decltype(&by_heads<8, 64>) fast = nullptr;
  if (GS % (bits == 8 ? 16 : 32) == 0 && (D == 64 || D == 128) && G >= 1 && G <= 8)
    fast = bits == 8 ? (D == 64 ? by_heads<8, 64> : by_heads<8, 128>) : (D == 64 ? by_heads<4, 64> : by_heads<4, 128>);
#ifdef TIDAL_AVX512_VNNI
  if (bits == 8 && GS % 64 == 0 && (D == 64 || D == 128) && G >= 1 && G <= 8 && vnni_enabled())
    fast = D == 64 ? int8_by_heads<64> : int8_by_heads<128>;
#endif
#endif
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qs(G * D);
    std::vector<int64_t> rows;
    Lookahead la;
    auto bytes = [](const auto* p) { return reinterpret_cast<const char*>(p); };
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / KVH, kh = idx % KVH, L = lp[b];
      const int64_t rb = BS * KVH;  // rows in a block
      la.next_seq(tp, MB, lp, BS, b, kh, KVH, end,
                  {{bytes(kc.codes), rb * kc.dq}, {bytes(vc.codes), rb * vc.dq}, {bytes(kc.scale), 2 * rb * kc.ng},
                   {bytes(kc.min), 2 * rb * kc.ng}, {bytes(vc.scale), 2 * rb * vc.ng}, {bytes(vc.min), 2 * rb * vc.ng}});
      const float* qb = qp + (b * H + kh * G) * D;
      for (int64_t i = 0; i < G * D; ++i) qs[i] = qb[i] * sc;
      rows.resize(L);
      token_rows(tp + b * MB, BS, L, rows.data(), KVH, kh);
      scores.resize(G * L);
      float* ob = op + (b * H + kh * G) * D;
#ifdef TIDAL_AVX512
      if (fast) {
        fast(G, kc, vc, qs.data(), rows.data(), L, GS, scores, ob, &la);
        continue;
      }
#endif
      if (bits == 8) attend_generic<8>(kc, vc, qs.data(), rows.data(), L, G, D, GS, scores, ob);
      else attend_generic<4>(kc, vc, qs.data(), rows.data(), L, G, D, GS, scores, ob);
    }
  });
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY(tidal_kv, m) {
  m.def("paged_decode_quant", &paged_decode_quant);
}
