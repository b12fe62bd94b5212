// Group-wise int4 and int8 weights read straight from weights/quant.py's layout: groups of 32 along the
// input, fp16 scale and min per group, w = scale * q + min with q unsigned; int4: byte j of a group holds
// value j (low nibble) and value j + 16 (high nibble) (GGUF Q4_1's layout, so a Q4_1 file's blocks are
// used as they are); int8: one byte per value (a symmetric int8 group, e.g. from GGUF Q8_0, has
// min = -128 * scale). int8_gemv / int8_dequant are the int8 forms of the two functions below.
//  - int4_gemv, for a few rows (decode): each activation row is quantized to int8 per group of 32
//    (symmetric, like llama.cpp's Q8 blocks), and 64 weights at a time are multiplied with AVX-512 VNNI
//    (vpdpbusd: unsigned 4-bit weight x signed 8-bit activation, int32 sums). The min term,
//    min . sum(x) over each group, uses the fp32 activations. One parallel region per call, over rows.
//  - int4_dequant, for prefill-sized batches: the float weight into a caller's buffer, for a GEMM.
// int4_gemv_supported() says whether this build has the VNNI path (-march=native decides).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>
#include "fused_ops.h"
#include "int4_linear.h"

#ifdef TIDAL_VNNI
#include <immintrin.h>
#endif

namespace {
constexpr int64_t G = 32;          // values per group
constexpr int64_t MAX_GROUPS = 512;  // K <= 16384
constexpr int64_t PREFETCH_TILES = 4;

// the input size of a checked (uint8 data, fp16 scale, fp16 min) weight of `bits`
int64_t check_weight(const torch::Tensor& q, const torch::Tensor& s, const torch::Tensor& m, int bits) {
  TORCH_CHECK(q.scalar_type() == at::kByte && q.dim() == 2 && q.is_contiguous(), "int", bits,
              " weight: uint8 [out, in", bits == 4 ? "/2]" : "]");
  TORCH_CHECK(s.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf && s.is_contiguous() && m.is_contiguous(),
              "int", bits, " weight: fp16 contiguous scale and min");
  const int64_t N = q.size(0), K = q.size(1) * (bits == 4 ? 2 : 1);
  TORCH_CHECK(s.numel() == N * (K / G) && m.numel() == N * (K / G), "int", bits, " weight: group size must be 32");
  return K;
}

#ifdef TIDAL_VNNI
// Activation rows quantized per group of 32. For int4 weights each 64-value chunk (groups 2c, 2c+1 = A, B)
// is stored in the order the weight bytes unpack to: A0-15, B0-15, A16-31, B16-31; for int8, in order.
using Acts = Int4Acts;

template <typename T>
void quantize_acts(const T* x, int64_t M, int64_t K, Acts& a, bool int4_order) {
  const int64_t NG = K / G;
  a.M = M;
  a.K = K;
  a.q.resize(M * K);
  a.d.resize(M * NG);
  a.sum.resize(M * NG);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t g = 0; g < NG; ++g) {
      float v[G], amax = 0.f, s = 0.f;
      for (int64_t i = 0; i < G; ++i) {
        v[i] = static_cast<float>(x[r * K + g * G + i]);
        amax = std::max(amax, std::fabs(v[i]));
        s += v[i];
      }
      const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      a.d[r * NG + g] = d;
      a.sum[r * NG + g] = s;
      int8_t* dst = a.q.data() + r * K + (int4_order ? (g / 2) * 64 + (g % 2) * 16 : g * G);
      const int64_t second = int4_order ? 32 : 16;
      for (int64_t i = 0; i < 16; ++i) {
        dst[i] = static_cast<int8_t>(std::nearbyint(v[i] * id));
        dst[second + i] = static_cast<int8_t>(std::nearbyint(v[16 + i] * id));
      }
    }
}

inline __mmask16 tail(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1); }

// y[r, n] for MB activation rows from r0 and NR weight rows from n: NR x MB independent accumulators, so
// the FMA chains overlap and each activation chunk is loaded once for NR rows
template <int MB, int NR, int BITS, typename TO>
inline void gemv_tile(const uint8_t* qw, const at::Half* ws, const at::Half* wm, const Acts& a, int64_t r0, int64_t K,
                      int64_t N, int64_t n, TO* y) {
  const int64_t NG = K / G, NC = K / 64, NGP = (NG + 15) / 16 * 16, RB = BITS == 4 ? K / 2 : K;
  const __m256i nib = _mm256_set1_epi8(0x0F);
  // which of a chunk's two groups each int32 lane of vpdpbusd's result belongs to
  const __m512i pick = BITS == 4 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1)
                                 : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  alignas(64) float comb[NR * MB * (MAX_GROUPS + 16)];
  __m512 acc[NR][MB];
  // per group: the combined scale (weight scale x activation step), and the min term min * sum(x)
  for (int j = 0; j < NR; ++j) {
    for (int r = 0; r < MB; ++r) acc[j][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < NG; g += 16) {
      const __mmask16 k = tail(NG - g);
      const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, ws + (n + j) * NG + g));
      const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, wm + (n + j) * NG + g));
      for (int r = 0; r < MB; ++r) {
        const int64_t o = (r0 + r) * NG + g;
        _mm512_store_ps(comb + (j * MB + r) * NGP + g, _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(k, a.d.data() + o)));
        acc[j][r] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, a.sum.data() + o), acc[j][r]);
      }
    }
  }
  // the weight stream runs ahead of the compute: prefetch PREFETCH_TILES tiles on, spread over the chunks,
  // every line of the tile, into L2 (T1). On Zen 4 the int8 LM head (49152 x 576, from memory) took 1.55 ms
  // with two lines a chunk into L1 (half an int8 tile's lines), 1.50 with all of them, 0.85 with all into L2
  const char* ahead = reinterpret_cast<const char*>(qw + (n + NR * PREFETCH_TILES) * RB);
  const char* end = reinterpret_cast<const char*>(qw + N * RB);
  const int64_t tile_bytes = NR * RB, step = (tile_bytes + NC - 1) / NC;
  for (int64_t c = 0; c < NC; ++c) {
    for (int64_t l = 0; l < step; l += 64)
      if (ahead + c * step + l < end) _mm_prefetch(ahead + c * step + l, _MM_HINT_T1);
    __m512i w[NR];
    for (int j = 0; j < NR; ++j) {
      if (BITS == 8) {
        w[j] = _mm512_loadu_si512(qw + (n + j) * RB + c * 64);
        continue;
      }
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qw + (n + j) * RB + c * 32));
      const __m256i lo = _mm256_and_si256(b, nib), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
      w[j] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
    for (int r = 0; r < MB; ++r) {
      const __m512i xq = _mm512_loadu_si512(a.q.data() + (r0 + r) * K + c * 64);
      for (int j = 0; j < NR; ++j) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[j], xq);
        const __m512 pair = _mm512_castps128_ps512(
            _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(comb + (j * MB + r) * NGP + 2 * c))));
        acc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(pick, pair), acc[j][r]);
      }
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < MB; ++r) y[(r0 + r) * N + n + j] = static_cast<TO>(_mm512_reduce_add_ps(acc[j][r]));
}

// every activation row against NR weight rows from n (the tile stays in L1 while it is reused)
template <int NR, int BITS, typename TO>
inline void gemv_rows_tile(const uint8_t* qw, const at::Half* ws, const at::Half* wm, const Acts& a, int64_t M,
                           int64_t K, int64_t N, int64_t n, TO* y) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4) gemv_tile<4, NR, BITS>(qw, ws, wm, a, r, K, N, n, y);
  switch (M - r) {
    case 3: gemv_tile<3, NR, BITS>(qw, ws, wm, a, r, K, N, n, y); break;
    case 2: gemv_tile<2, NR, BITS>(qw, ws, wm, a, r, K, N, n, y); break;
    case 1: gemv_tile<1, NR, BITS>(qw, ws, wm, a, r, K, N, n, y); break;
    default: break;
  }
}

template <int BITS, typename TO>
void gemv_rows(const uint8_t* qw, const at::Half* ws, const at::Half* wm, const Acts& a, int64_t M, int64_t K,
               int64_t N, int64_t n0, int64_t n1, TO* y) {
  int64_t n = n0;
  if (M <= 2)   // with more activation rows, 4 x M accumulators no longer fit the registers
    for (; n + 4 <= n1; n += 4) gemv_rows_tile<4, BITS>(qw, ws, wm, a, M, K, N, n, y);
  for (; n < n1; ++n) gemv_rows_tile<1, BITS>(qw, ws, wm, a, M, K, N, n, y);
}

template <int BITS>
void gemv_range(const Acts& a, const torch::Tensor& q, const torch::Tensor& s, const torch::Tensor& m,
                torch::Tensor& y, int64_t n0, int64_t n1) {
  const uint8_t* qw = q.data_ptr<uint8_t>();
  const at::Half* ws = s.data_ptr<at::Half>();
  const at::Half* wm = m.data_ptr<at::Half>();
  const int64_t N = q.size(0);
  if (y.scalar_type() == at::kFloat) gemv_rows<BITS>(qw, ws, wm, a, a.M, a.K, N, n0, n1, y.data_ptr<float>());
  else gemv_rows<BITS>(qw, ws, wm, a, a.M, a.K, N, n0, n1, y.data_ptr<at::BFloat16>());
}

void quantize_rows(const torch::Tensor& x, Acts& a, bool int4_order) {
  if (x.scalar_type() == at::kFloat) quantize_acts(x.data_ptr<float>(), x.size(0), x.size(1), a, int4_order);
  else quantize_acts(x.data_ptr<at::BFloat16>(), x.size(0), x.size(1), a, int4_order);
}
#endif
}  // namespace

#ifdef TIDAL_VNNI
void int4_quantize_acts(const torch::Tensor& x, Int4Acts& a) { quantize_rows(x, a, true); }

void int4_gemv_range(const Int4Acts& a, const torch::Tensor& q, const torch::Tensor& s, const torch::Tensor& m,
                     torch::Tensor& y, int64_t n0, int64_t n1) {
  gemv_range<4>(a, q, s, m, y, n0, n1);
}
#endif

bool int4_gemv_supported() {
#ifdef TIDAL_VNNI
  return true;
#else
  return false;
#endif
}

namespace {
torch::Tensor quant_gemv(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& s, const torch::Tensor& m,
                         int bits) {
  const int64_t K = check_weight(q, s, m, bits), N = q.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous(), "int", bits, "_gemv: x must be contiguous [rows, ",
              K, "]");
  TORCH_CHECK(K % 64 == 0 && K / G <= MAX_GROUPS, "int", bits, "_gemv: the input size must be a multiple of 64, at most ",
              MAX_GROUPS * G);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int", bits,
              "_gemv: fp32 or bf16 input");
#ifdef TIDAL_VNNI
  auto y = torch::empty({x.size(0), N}, x.options());
  Acts a;
  quantize_rows(x, a, bits == 4);
  const int64_t grain = std::max<int64_t>(16, N / (4 * at::get_num_threads()));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    if (bits == 4) gemv_range<4>(a, q, s, m, y, n0, n1);
    else gemv_range<8>(a, q, s, m, y, n0, n1);
  });
  return y;
#else
  TORCH_CHECK(false, "int", bits, "_gemv: this build has no AVX-512 VNNI (check int4_gemv_supported())");
#endif
}

torch::Tensor quant_dequant(const torch::Tensor& q, const torch::Tensor& s, const torch::Tensor& m, torch::Tensor out,
                            int bits) {
  const int64_t K = check_weight(q, s, m, bits), N = q.size(0), NG = K / G, RB = bits == 4 ? K / 2 : K;
  TORCH_CHECK(out.is_contiguous() && out.numel() == N * K, "int", bits, "_dequant: out must be contiguous with ", N * K,
              " values");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "quant_dequant", [&] {
    const uint8_t* qw = q.data_ptr<uint8_t>();
    const at::Half* ws = s.data_ptr<at::Half>();
    const at::Half* wm = m.data_ptr<at::Half>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t g = 0; g < NG; ++g) {
          const float sc = static_cast<float>(ws[n * NG + g]), mn = static_cast<float>(wm[n * NG + g]);
          scalar_t* og = o + n * K + g * G;
          if (bits == 8) {
            const uint8_t* b = qw + n * RB + g * G;
            for (int64_t j = 0; j < G; ++j) og[j] = static_cast<scalar_t>(sc * static_cast<float>(b[j]) + mn);
            continue;
          }
          const uint8_t* b = qw + n * RB + g * (G / 2);
          for (int64_t j = 0; j < G / 2; ++j) {
            og[j] = static_cast<scalar_t>(sc * static_cast<float>(b[j] & 15) + mn);
            og[j + G / 2] = static_cast<scalar_t>(sc * static_cast<float>(b[j] >> 4) + mn);
          }
        }
    });
  });
  return out;
}
}  // namespace

// x [M, in] (fp32 or bf16) times the weight's transpose -> [M, out] in x's dtype
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor s, torch::Tensor m) {
  return quant_gemv(x, q, s, m, 4);
}
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor s, torch::Tensor m) {
  return quant_gemv(x, q, s, m, 8);
}

// the float weight [out, in] (out's dtype: fp32 or bf16); returns out
torch::Tensor int4_dequant(torch::Tensor q, torch::Tensor s, torch::Tensor m, torch::Tensor out) {
  return quant_dequant(q, s, m, out, 4);
}
torch::Tensor int8_dequant(torch::Tensor q, torch::Tensor s, torch::Tensor m, torch::Tensor out) {
  return quant_dequant(q, s, m, out, 8);
}
