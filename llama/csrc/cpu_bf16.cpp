// The bf16 work of a CPU decode step, as torch ops under llama_cpu:: (built and loaded by
// llama/kernels.py on AVX-512 BF16 CPUs). Each does in one call what the model's PyTorch code does in
// several operators, in float32 with the bf16 roundings of the code it replaces (tests/test_cpu.py
// bounds each against float64):
// - gemv_bf16: x W^T for a few rows (a decode step's batch) and Meta's row-major weight, streaming W
//   once at the memory's read speed; a row's result does not depend on the other rows in the batch.
// - rms_norm_bf16: RMSNorm, normalised in float32, rounded, then scaled by the weight.
// - rope_bf16: the interleaved complex rotation of q and k.
// - attend_one_bf16: softmax(q k^T / sqrt(D)) v for one new token over the cached positions.
// - mm_int8 / mm_int4: x (w q)^T for any number of rows and int8 / int4 weights in the layouts of
//   llama.quantized_linear's Int8Linear / Int4Linear (blocks of 32 output rows, each read as one
//   stream). Each x row is rounded to int8 per group of inputs (as llama.cpp rounds activations to
//   q8_0), so that 8-bit x 8-bit and 4-bit x 8-bit products sum in integers (AVX-512 VNNI); a
//   row's result does not depend on the other rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include <immintrin.h>
#include <torch/library.h>

namespace {

// An output for x's rows with N values each: x's shape with N last.
at::Tensor rows_like(const at::Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return at::empty(sizes, x.options());
}

// The sum of v's 16 lanes in one fixed order: ((e0 + e8) + (e4 + e12)) + ((e2 + e10) + (e6 + e14)),
// plus the same for the odd lanes (the order of GCC's _mm512_reduce_add_ps, written out so that no
// compiler can choose another).
inline float sum_lanes(__m512 v) {
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// sum_lanes of each of v[0..15], each in its order, in 15 adds instead of 60: lane 4a + b holds v[4b + a]'s.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 s1[8], s2[4], s3[2];
  for (int p = 0; p < 8; p++)  // lanes i + 8: each vector's 8 partial sums in two 128-bit lanes
    s1[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int p = 0; p < 4; p++)  // i + 4: 4 partial sums, one 128-bit lane per vector
    s2[p] = _mm512_add_ps(_mm512_shuffle_f32x4(s1[2 * p], s1[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(s1[2 * p], s1[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int p = 0; p < 2; p++)  // i + 2
    s3[p] = _mm512_add_ps(_mm512_shuffle_ps(s2[2 * p], s2[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm512_shuffle_ps(s2[2 * p], s2[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_ps(s3[0], s3[1], _MM_SHUFFLE(2, 0, 2, 0)),  // i + 1
                       _mm512_shuffle_ps(s3[0], s3[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// A tile of MR rows of x (at most 4) by NR weight rows n..n+NR-1: each output's dot product is one
// float32 sum over k in order, then one horizontal add in sum_lanes's order; the same for every
// output whatever the tile and batch sizes, so that a row's result never depends on how many rows
// share the call. A tile loads NR weight and MR x vectors for MR * NR dot-product instructions.
// Where next is given (the following tile's NR weight rows, as many bytes again), each step asks the
// L2 cache for as many of its lines as the step reads of this tile's, so the next rows arrive while
// this tile computes: the hardware prefetcher alone, following NR streams at the pace of the
// arithmetic, left a 110m decode step's linears 1.4x (1 row) to 1.8x (8 rows) slower. Into L2, not
// L1: a tile of 1.1B's rows would push this tile's rows and x out of L1 (that made 1.1B slower).
template <int MR, int NR>
inline void dot_tile(const uint16_t* x, const uint16_t* w, int64_t K, int64_t N, c10::BFloat16* y, int64_t n,
                     const char* next) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; m++)
    for (int j = 0; j < NR; j++) acc[m][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (next)
      for (int j = 0; j < NR; j++) _mm_prefetch(next + (k / 32 * NR + j) * 64, _MM_HINT_T1);
    __m512bh wv[NR];
    for (int j = 0; j < NR; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w + (n + j) * K + k);
    for (int m = 0; m < MR; m++) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      for (int j = 0; j < NR; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wv[j], xv);
    }
  }
  if (k < K) {  // the last partial block, zero-padded by masked loads
    __mmask32 mask = (__mmask32)((1u << (K - k)) - 1);
    __m512bh wv[NR];
    for (int j = 0; j < NR; j++) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + (n + j) * K + k);
    for (int m = 0; m < MR; m++) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
      for (int j = 0; j < NR; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wv[j], xv);
    }
  }
  if constexpr (MR * NR == 16) {  // the tiles of 2 to 4 rows of x: their sums at once, in the same order
    alignas(64) float sums[16];
    _mm512_store_ps(sums, sum_lanes16(&acc[0][0]));
    for (int t = 0; t < 16; t++)  // rounded to nearest even, as ATen does
      y[t / NR * N + n + t % NR] = c10::BFloat16(sums[4 * (t % 4) + t / 4]);
  } else {
    for (int m = 0; m < MR; m++)
      for (int j = 0; j < NR; j++) y[m * N + n + j] = c10::BFloat16(sum_lanes(acc[m][j]));
  }
}

template <int NR>
inline void tile(const uint16_t* x, int64_t rows, const uint16_t* w, int64_t K, int64_t N, c10::BFloat16* y,
                 int64_t n, const char* next) {
  switch (rows) {
    case 1: dot_tile<1, NR>(x, w, K, N, y, n, next); break;
    case 2: dot_tile<2, NR>(x, w, K, N, y, n, next); break;
    case 3: dot_tile<3, NR>(x, w, K, N, y, n, next); break;
    default: dot_tile<4, NR>(x, w, K, N, y, n, next); break;
  }
}

// Outputs begin..end for all M rows, a few outputs at a time: their weight rows are read from memory
// once (the first four rows of x prefetching the next outputs' weights), then stay in the L1 cache
// while the rows of x go past them four at a time.
template <int NR>
void rows(const uint16_t* x, int64_t M, const uint16_t* w, int64_t K, int64_t N, c10::BFloat16* y, int64_t begin,
          int64_t end) {
  int64_t n = begin;
  for (; n + NR <= end; n += NR) {
    const char* next = n + 2 * NR <= end ? (const char*)(w + (n + NR) * K) : nullptr;
    for (int64_t m = 0; m < M; m += 4)
      tile<NR>(x + m * K, std::min<int64_t>(4, M - m), w, K, N, y + m * N, n, m == 0 ? next : nullptr);
  }
  for (; n < end; n++)  // the last few outputs, one at a time
    for (int64_t m = 0; m < M; m += 4)
      tile<1>(x + m * K, std::min<int64_t>(4, M - m), w, K, N, y + m * N, n, nullptr);
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemv_bf16: bf16 tensors only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.dim() == 2 && x.size(-1) == w.size(1), "gemv_bf16: bad layout");
  int64_t K = w.size(1), N = w.size(0), M = K ? x.numel() / K : 0;
  TORCH_CHECK(M >= 1, "gemv_bf16: no rows");
  at::Tensor y = rows_like(x, N);
  auto xp = (const uint16_t*)x.data_ptr(), wp = (const uint16_t*)w.data_ptr();
  auto yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    if (M <= 2)  // more outputs at a time: enough independent sums to hide the instruction's latency
      rows<8>(xp, M, wp, K, N, yp, begin, end);
    else
      rows<4>(xp, M, wp, K, N, yp, begin, end);
  });
  return y;
}

inline float f32(c10::BFloat16 v) { return static_cast<float>(v); }

at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& w, double eps) {
  int64_t D = w.numel();
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "rms_norm_bf16: bf16 tensors only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.size(-1) == D, "rms_norm_bf16: bad layout");
  at::Tensor y = at::empty_like(x);
  auto xp = x.data_ptr<c10::BFloat16>(), wp = w.data_ptr<c10::BFloat16>(), yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, x.numel() / D, std::max<int64_t>(1, 65536 / D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const c10::BFloat16* xr = xp + r * D;
      float sum = 0;
      for (int64_t i = 0; i < D; i++) sum += f32(xr[i]) * f32(xr[i]);
      float scale = 1.0f / std::sqrt(sum / D + static_cast<float>(eps));
      for (int64_t i = 0; i < D; i++)  // x * rsqrt(...) rounded to bf16, then times the weight, rounded
        yp[r * D + i] = c10::BFloat16(f32(c10::BFloat16(f32(xr[i]) * scale)) * f32(wp[i]));
    }
  });
  return y;
}

// x [B, T, H, D] rotated by freqs [T, D/2, 2] (cos, sin as float32 pairs): (x0 + i x1) * (c + i s).
at::Tensor rotate(const at::Tensor& x, const at::Tensor& freqs) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 4, "rope_bf16: bad q or k");
  int64_t B = x.size(0), T = x.size(1), HD = x.size(2) * x.size(3), D = x.size(3);
  at::Tensor y = at::empty_like(x);
  auto xp = x.data_ptr<c10::BFloat16>(), yp = y.data_ptr<c10::BFloat16>();
  auto fp = freqs.data_ptr<float>();
  at::parallel_for(0, B * T, std::max<int64_t>(1, 65536 / HD), [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; bt++) {
      const float* f = fp + (bt % T) * D;
      for (int64_t j = 0; j < HD; j += 2) {
        float a = f32(xp[bt * HD + j]), b = f32(xp[bt * HD + j + 1]), c = f[j % D], s = f[j % D + 1];
        yp[bt * HD + j] = c10::BFloat16(a * c - b * s);
        yp[bt * HD + j + 1] = c10::BFloat16(a * s + b * c);
      }
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> rope_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& freqs) {
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.is_contiguous() && freqs.size(0) == q.size(1) &&
              freqs.size(1) * 2 == q.size(3), "rope_bf16: freqs must be [T, D/2, 2] float32");
  return {rotate(q, freqs), rotate(k, freqs)};
}

// e^x for x <= 0, to float32's precision: 2^n e^f with |f| <= ln2/2 and a degree-7 Taylor polynomial.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // e^-104 is below float32's smallest value: 0
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), f);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// n <= 16 bf16 values from p as float32 lanes (the rest zero).
inline __m512 load16(const c10::BFloat16* p, int64_t n) {
  __mmask16 mask = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
  __m256i v = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// The 16 horizontal sums of v[0..15], in that order, by a butterfly of in-lane and cross-lane adds.
inline __m512 sum16(const __m512* v) {
  __m512 x[8], z[4];
  for (int i = 0; i < 8; i++)
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++)
    z[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
  __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// One (batch row, head) of attend_one_bf16, with D = 16 CH so that q and the sums stay in registers.
template <int CH>
void attend_head(const c10::BFloat16* q, const c10::BFloat16* k, const c10::BFloat16* v, int64_t S, int64_t sk,
                 int64_t sv, float* p, c10::BFloat16* out) {
  constexpr int P = (CH + 1) / 2;  // 32-wide pairs of q; an odd CH leaves the last half zero
  __m512bh qv[P];
  __mmask32 masks[P];
  for (int c = 0; c < P; c++) {
    masks[c] = 2 * c + 1 < CH ? ~(__mmask32)0 : (__mmask32)0xffff;
    qv[c] = (__m512bh)_mm512_maskz_loadu_epi16(masks[c], q + 32 * c);
  }
  const __m512 root = _mm512_set1_ps(std::sqrt(16.0f * CH));
  int64_t blocks = (S + 15) / 16;
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t blk = 0; blk < blocks; blk++) {  // scores q . k_s / sqrt(D), 16 positions at a time
    __m512 dots[16];
    for (int j = 0; j < 16; j++) {
      const c10::BFloat16* ks = k + std::min(blk * 16 + j, S - 1) * sk;  // past S: the last again, masked below
      dots[j] = _mm512_setzero_ps();
      for (int c = 0; c < P; c++)
        dots[j] = _mm512_dpbf16_ps(dots[j], qv[c], (__m512bh)_mm512_maskz_loadu_epi16(masks[c], ks + 32 * c));
    }
    __mmask16 live = S - blk * 16 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (S - blk * 16)) - 1);
    __m512 sc = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY), _mm512_div_ps(sum16(dots), root));
    _mm512_storeu_ps(p + blk * 16, sc);
    top = _mm512_max_ps(top, sc);
  }
  __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top)), total = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < blocks; blk++) {  // softmax's numerators and their sum
    __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(p + blk * 16), m));
    _mm512_storeu_ps(p + blk * 16, e);
    total = _mm512_add_ps(total, e);
  }
  __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total)), acc[CH];
  for (int c = 0; c < CH; c++) acc[c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; s++) {  // the probability-weighted sum of the values
    __m512 w = _mm512_mul_ps(_mm512_set1_ps(p[s]), inv);
    for (int c = 0; c < CH; c++) acc[c] = _mm512_fmadd_ps(w, load16(v + s * sv + 16 * c, 16), acc[c]);
  }
  alignas(64) float row[16];
  for (int c = 0; c < CH; c++) {
    _mm512_store_ps(row, acc[c]);
    for (int d = 0; d < 16; d++) out[16 * c + d] = c10::BFloat16(row[d]);
  }
}

using AttendHead = void (*)(const c10::BFloat16*, const c10::BFloat16*, const c10::BFloat16*, int64_t, int64_t,
                            int64_t, float*, c10::BFloat16*);
constexpr AttendHead attend_heads[] = {attend_head<1>, attend_head<2>, attend_head<3>, attend_head<4>,
                                       attend_head<5>, attend_head<6>, attend_head<7>, attend_head<8>};

// q [B, H, 1, D]; keys, values [B, Hkv, S, D] (views of the cache: any strides but D's); out [B, H, 1, D].
// D a multiple of 16, at most 128. lengths [B] (int64, optional): row b attends to its first lengths[b]
// positions alone, computing what it would over keys[b, :, :lengths[b]] (rows at their own positions).
at::Tensor attend_one_bf16(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                           const std::optional<at::Tensor>& lengths) {
  int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = keys.size(1), S = keys.size(2);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 &&
              values.scalar_type() == at::kBFloat16 && q.size(2) == 1 && H % Hkv == 0 && keys.stride(3) == 1 &&
              values.stride(3) == 1 && q.stride(3) == 1 && keys.sizes() == values.sizes() && S >= 1 &&
              D % 16 == 0 && D <= 128, "attend_one_bf16: bad layout");
  std::vector<int64_t> len(B, S);
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->dim() == 1 && lengths->size(0) == B &&
                    lengths->is_contiguous(), "attend_one_bf16: lengths is one int64 per row");
    const int64_t* lp = lengths->data_ptr<int64_t>();
    for (int64_t b = 0; b < B; b++) {
      TORCH_CHECK(lp[b] >= 1 && lp[b] <= S, "attend_one_bf16: a row's length is outside 1..S");
      len[b] = lp[b];
    }
  }
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  auto qp = q.data_ptr<c10::BFloat16>(), kp = keys.data_ptr<c10::BFloat16>(), vp = values.data_ptr<c10::BFloat16>();
  auto op = out.data_ptr<c10::BFloat16>();
  int64_t qb = q.stride(0), qh = q.stride(1), kb = keys.stride(0), kh = keys.stride(1), ks = keys.stride(2);
  int64_t vb = values.stride(0), vh = values.stride(1), vs = values.stride(2), group = H / Hkv;
  AttendHead head = attend_heads[D / 16 - 1];
  at::parallel_for(0, B * H, std::max<int64_t>(1, 32768 / (S * D)), [&](int64_t begin, int64_t end) {
    std::vector<float> p((S + 15) / 16 * 16);
    for (int64_t bh = begin; bh < end; bh++) {
      int64_t b = bh / H, h = bh % H;
      head(qp + b * qb + h * qh, kp + b * kb + h / group * kh, vp + b * vb + h / group * vh, len[b], ks, vs,
           p.data(), op + bh * D);
    }
  });
  return out;
}

// x rounded to int8 per group of G inputs, a = round(x / s) with s = max|x| / 127: for each row and
// group, s, the float sum of x (for int4's zero term) and bias * sum(a), the integer sums' starting
// point that undoes the weights' offset (int4: nibbles q hold q - 8, bias -8; int8: bytes hold q + 128,
// bias -128). Rows are zero-padded to whole groups.
struct Int8Groups {
  int64_t stride;  // of a's rows: K rounded up to whole groups
  std::vector<int8_t> a;
  std::vector<float> scale, sum;
  std::vector<int32_t> offset;
};

Int8Groups int8_groups(const c10::BFloat16* x, int64_t M, int64_t K, int64_t G, int32_t bias) {
  int64_t NG = (K + G - 1) / G;
  Int8Groups q{NG * G, std::vector<int8_t>(M * NG * G), std::vector<float>(M * NG), std::vector<float>(M * NG),
               std::vector<int32_t>(M * NG)};
  at::parallel_for(0, M * NG, std::max<int64_t>(1, 16384 / G), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {  // i = row * NG + group
      int64_t m = i / NG, k0 = i % NG * G;
      const c10::BFloat16* xg = x + m * K + k0;
      auto load = [&](int64_t j) {  // 16 inputs as float32 (bf16 bits shifted into the top half), 0 past K
        __mmask16 in = (__mmask16)((1u << std::clamp<int64_t>(K - k0 - j, 0, 16)) - 1);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, xg + j)), 16));
      };
      __m512 top = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < G; j += 16) {
        __m512 v = load(j);
        top = _mm512_max_ps(top, _mm512_abs_ps(v));
        sum = _mm512_add_ps(sum, v);
      }
      float t = _mm512_reduce_max_ps(top), s = t > 0 ? t / 127 : 1.0f;
      __m512 inv = _mm512_set1_ps(t > 0 ? 127 / t : 0.0f);
      __m512i total = _mm512_setzero_si512();
      for (int64_t j = 0; j < G; j += 16) {
        __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(load(j), inv));  // nearest, ties to even
        _mm_storeu_si128((__m128i*)(q.a.data() + m * q.stride + k0 + j), _mm512_cvtsepi32_epi8(a));
        total = _mm512_add_epi32(total, a);
      }
      q.scale[i] = s;
      q.sum[i] = _mm512_reduce_add_ps(sum);
      q.offset[i] = bias * _mm512_reduce_add_epi32(total);
    }
  });
  return q;
}

// llama.quantized_linear.Int4Linear's layout: output rows in blocks of 32 (kBlocks x 16), each block one
// stream through the inputs: for every group of G inputs, the 32 rows' (scale, zero) bf16 pairs
// (a 32-bit lane per row, 64 bytes per 16 rows), then the group's nibbles 8 inputs at a time, 64
// bytes per 16 rows: byte 4r + t holds q[r][k + t] in its low nibble and q[r][k + 4 + t] in its
// high one, so a 32-bit lane gathers 4 inputs of one row and one instruction (vpdpbusd) adds
// 4 products to each of 16 rows. Padding rows past the last output row are zeros.
constexpr int kBlocks = 2;

template <int G>
constexpr int64_t group_bytes() { return kBlocks * 64 * (1 + G / 8); }

// R rows of x (from row m0) against one block; rows[b] masks the outputs that exist. Where next is
// given (the following block), each load of this block asks L2 for the same line of that one, as
// gemv_bf16's tiles do (1.1-1.25x at 4 to 32 rows; int8's simpler stream gained nothing from it).
template <int R, int G>
void int4_block(const Int8Groups& q, int64_t m0, const uint8_t* w, int64_t K, const __mmask16* rows, int64_t N,
                c10::BFloat16* y, const uint8_t* next) {
  const int64_t NG = K / G;
  const __m512i nibble = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi32((int)0xFFFF0000);
  __m512 out[kBlocks][R], zero_terms[kBlocks][R];
  for (int b = 0; b < kBlocks; b++)
    for (int r = 0; r < R; r++) out[b][r] = zero_terms[b][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < NG; g++) {
    const uint8_t* wg = w + g * group_bytes<G>();
    __m512i acc[kBlocks][R];  // integer sums start at the offset's share, -8 * sum(a)
    for (int b = 0; b < kBlocks; b++)
      for (int r = 0; r < R; r++) acc[b][r] = _mm512_set1_epi32(q.offset[(m0 + r) * NG + g]);
#pragma GCC unroll 32
    for (int c = 0; c < G / 8; c++) {
      __m512i lo[kBlocks], hi[kBlocks];
      for (int b = 0; b < kBlocks; b++) {
        __m512i v = _mm512_loadu_si512(wg + (kBlocks + c * kBlocks + b) * 64);
        if (next) _mm_prefetch((const char*)(next + (wg - w) + (kBlocks + c * kBlocks + b) * 64), _MM_HINT_T1);
        lo[b] = _mm512_and_si512(v, nibble);
        hi[b] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      }
      for (int r = 0; r < R; r++) {
        const int8_t* a = q.a.data() + (m0 + r) * q.stride + g * G + c * 8;
        __m512i a0 = _mm512_set1_epi32(*(const int32_t*)a), a1 = _mm512_set1_epi32(*(const int32_t*)(a + 4));
        for (int b = 0; b < kBlocks; b++) {
          acc[b][r] = _mm512_dpbusd_epi32(acc[b][r], lo[b], a0);
          acc[b][r] = _mm512_dpbusd_epi32(acc[b][r], hi[b], a1);
        }
      }
    }
    for (int b = 0; b < kBlocks; b++) {  // out += scale * s * sum((q - 8) a) + zero * sum(x)
      __m512i pairs = _mm512_loadu_si512(wg + b * 64);
      __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)), zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, top));
      for (int r = 0; r < R; r++) {
        int64_t i = (m0 + r) * NG + g;
        out[b][r] = _mm512_fmadd_ps(scale, _mm512_mul_ps(_mm512_cvtepi32_ps(acc[b][r]), _mm512_set1_ps(q.scale[i])), out[b][r]);
        zero_terms[b][r] = _mm512_fmadd_ps(zero, _mm512_set1_ps(q.sum[i]), zero_terms[b][r]);
      }
    }
  }
  for (int b = 0; b < kBlocks; b++)
    for (int r = 0; r < R; r++)  // rounded to bf16 to nearest even, as c10::BFloat16 does
      _mm256_mask_storeu_epi16(y + b * 16 + (m0 + r) * N, rows[b],
                               (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(out[b][r], zero_terms[b][r])));
}

// Calls block.operator()<R>(s, rows, m0) for every block s of 32 output rows (rows[b]: which of
// its outputs exist) and every run of R <= 4 rows of x from m0; the blocks are spread over threads.
template <typename Block>
void each_block(int64_t M, int64_t N, const Block& block) {
  at::parallel_for(0, (N + 16 * kBlocks - 1) / (16 * kBlocks), 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; s++) {
      __mmask16 rows[kBlocks];
      for (int b = 0; b < kBlocks; b++) rows[b] = (__mmask16)((1u << std::clamp<int64_t>(N - (s * kBlocks + b) * 16, 0, 16)) - 1);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {  // a row's result does not depend on the others
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: block.template operator()<1>(s, rows, m0); break;
          case 2: block.template operator()<2>(s, rows, m0); break;
          case 3: block.template operator()<3>(s, rows, m0); break;
          default: block.template operator()<4>(s, rows, m0); break;
        }
      }
    }
  });
}

template <int G>
void int4_mm(const Int8Groups& q, int64_t M, int64_t K, int64_t N, const uint8_t* wp, c10::BFloat16* yp) {
  const int64_t stream = (K / G) * group_bytes<G>(), NS = (N + 16 * kBlocks - 1) / (16 * kBlocks);
  each_block(M, N, [&]<int R>(int64_t s, const __mmask16* rows, int64_t m0) {
    const uint8_t* next = m0 == 0 && s + 1 < NS ? wp + (s + 1) * stream : nullptr;
    int4_block<R, G>(q, m0, wp + s * stream, K, rows, N, yp + s * kBlocks * 16, next);
  });
}

at::Tensor mm_int4(const at::Tensor& x, const at::Tensor& w, int64_t N, int64_t G) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kByte, "mm_int4: bf16 x, uint8 w");
  int64_t K = x.size(-1), M = K ? x.numel() / K : 0, NS = (N + 16 * kBlocks - 1) / (16 * kBlocks);
  TORCH_CHECK(G == 32 || G == 64 || G == 128 || G == 256, "mm_int4: group size 32, 64, 128 or 256, not ", G);
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && K % G == 0 && w.dim() == 3 && w.size(0) == NS &&
              w.size(1) == K / G && w.size(2) == kBlocks * 64 * (1 + G / 8), "mm_int4: bad layout");
  at::Tensor y = rows_like(x, N);
  if (M == 0) return y;
  Int8Groups q = int8_groups(x.data_ptr<c10::BFloat16>(), M, K, G, -8);
  auto wp = static_cast<const uint8_t*>(w.data_ptr());
  auto yp = y.data_ptr<c10::BFloat16>();
  switch (G) {
    case 32: int4_mm<32>(q, M, K, N, wp, yp); break;
    case 64: int4_mm<64>(q, M, K, N, wp, yp); break;
    case 128: int4_mm<128>(q, M, K, N, wp, yp); break;
    default: int4_mm<256>(q, M, K, N, wp, yp); break;
  }
  return y;
}

// llama.quantized_linear.Int8Linear's layout: output rows in blocks of 32, each one stream: the 32 rows'
// bf16 scales (64 bytes), then the inputs 4 at a time, 64 bytes per 16 rows: byte 4r + t holds
// q[r][k + t] + 128 (unsigned, as vpdpbusd takes it), inputs past K zero.
constexpr int64_t kInt8Group = 64;  // inputs per activation scale

template <int R>
void int8_block(const Int8Groups& q, int64_t m0, const uint8_t* w, int64_t NG, const __mmask16* rows, int64_t N,
                c10::BFloat16* y) {
  __m512 out[kBlocks][R];
  for (int b = 0; b < kBlocks; b++)
    for (int r = 0; r < R; r++) out[b][r] = _mm512_setzero_ps();
  const uint8_t* wk = w + kBlocks * 32;
  for (int64_t g = 0; g < NG; g++) {
    __m512i acc[kBlocks][R];
    for (int b = 0; b < kBlocks; b++)
      for (int r = 0; r < R; r++) acc[b][r] = _mm512_set1_epi32(q.offset[(m0 + r) * NG + g]);
#pragma GCC unroll 16
    for (int c = 0; c < kInt8Group / 4; c++) {
      __m512i v[kBlocks];
      for (int b = 0; b < kBlocks; b++) v[b] = _mm512_loadu_si512(wk + ((g * kInt8Group / 4 + c) * kBlocks + b) * 64);
      for (int r = 0; r < R; r++) {
        __m512i a = _mm512_set1_epi32(*(const int32_t*)(q.a.data() + (m0 + r) * q.stride + g * kInt8Group + c * 4));
        for (int b = 0; b < kBlocks; b++) acc[b][r] = _mm512_dpbusd_epi32(acc[b][r], v[b], a);
      }
    }
    for (int b = 0; b < kBlocks; b++)
      for (int r = 0; r < R; r++)
        out[b][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[b][r]), _mm512_set1_ps(q.scale[(m0 + r) * NG + g]), out[b][r]);
  }
  for (int b = 0; b < kBlocks; b++) {
    __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + b * 32))), 16));
    for (int r = 0; r < R; r++)
      _mm256_mask_storeu_epi16(y + b * 16 + (m0 + r) * N, rows[b], (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(out[b][r], scale)));
  }
}

at::Tensor mm_int8(const at::Tensor& x, const at::Tensor& w, int64_t N) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kByte, "mm_int8: bf16 x, uint8 w");
  int64_t K = x.size(-1), M = K ? x.numel() / K : 0, NS = (N + 16 * kBlocks - 1) / (16 * kBlocks);
  int64_t NG = (K + kInt8Group - 1) / kInt8Group, stream = kBlocks * 32 + NG * kInt8Group * kBlocks * 16;
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.dim() == 2 && w.size(0) == NS && w.size(1) == stream,
              "mm_int8: bad layout");
  at::Tensor y = rows_like(x, N);
  if (M == 0) return y;
  Int8Groups q = int8_groups(x.data_ptr<c10::BFloat16>(), M, K, kInt8Group, -128);
  auto wp = static_cast<const uint8_t*>(w.data_ptr());
  auto yp = y.data_ptr<c10::BFloat16>();
  each_block(M, N, [&]<int R>(int64_t s, const __mmask16* rows, int64_t m0) {
    int8_block<R>(q, m0, wp + s * stream, NG, rows, N, yp + s * kBlocks * 16);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(llama_cpu, m) {
  m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("rms_norm_bf16(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope_bf16(Tensor q, Tensor k, Tensor freqs) -> (Tensor, Tensor)");
  m.def("attend_one_bf16(Tensor q, Tensor keys, Tensor values, Tensor? lengths=None) -> Tensor");
  m.def("mm_int8(Tensor x, Tensor w, int out_features) -> Tensor");
  m.def("mm_int4(Tensor x, Tensor w, int out_features, int group_size) -> Tensor");
}
TORCH_LIBRARY_IMPL(llama_cpu, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("rms_norm_bf16", &rms_norm_bf16);
  m.impl("rope_bf16", &rope_bf16);
  m.impl("attend_one_bf16", &attend_one_bf16);
  m.impl("mm_int8", &mm_int8);
  m.impl("mm_int4", &mm_int4);
}
