// AVX2 level (AVX2, FMA, F16C, POPCNT, BMI2): hand-written BinaryMatMul (own weight layout),
// XnorMatMul, SparseMatMul's transposed path, single-row GEMV and row walk, SparseConv's unit-stride
// planes, and QuantMatMul; the other kernels (X binarization, multi-row sparse tiles) are the generic
// ones compiled with these flags.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace onnxopt {
namespace isa_avx2 {
#include "kernels_generic.inc"
#include "x86_helpers.inc"

// Tile grid: column blocks [c0, c1) in chunks of `chunk` (a chunk's weights stay in L2 while the
// row tiles pass over it); rows in tiles of RT, then 2 (if TWO_ROWS), then 1. A row tile covers CBR
// column blocks; a single row (GEMV) covers CB1 (remainders: one block). Calls tile(RT, CB, m, cb)
// with compile-time RT, CB.
template <int RT, int CBR, int CB1, bool TWO_ROWS, class Tile>
static inline void tile_grid(int64_t m0, int64_t m1, int64_t c0, int64_t c1, int64_t chunk, Tile&& tile) {
  using I1 = std::integral_constant<int, 1>;
  for (int64_t cc = c0; cc < c1; cc += chunk) {
    const int64_t ce = std::min(c1, cc + chunk);
    auto blocks = [&](auto rt, auto cbw, int64_t m) {
      int64_t cb = cc;
      for (; cb + cbw() <= ce; cb += cbw()) tile(rt, cbw, m, cb);
      for (; cb < ce; ++cb) tile(rt, I1{}, m, cb);
    };
    int64_t m = m0;
    for (; m + RT <= m1; m += RT) blocks(std::integral_constant<int, RT>{}, std::integral_constant<int, CBR>{}, m);
    if constexpr (TWO_ROWS)
      for (; m + 2 <= m1; m += 2) blocks(std::integral_constant<int, 2>{}, std::integral_constant<int, CBR>{}, m);
    for (; m < m1; ++m) blocks(I1{}, std::integral_constant<int, CB1>{}, m);
  }
}

// ---------------------------------------------------------------- Binary
// vpermps indexes 8 floats and reads only the low 3 bits of each lane, so this level works on groups
// of 3 K rows: 10 groups per 32-bit lane word (30 rows), one column per lane, 8 columns per block.
// Each group then costs one shift, one vpermps and one add per 8 columns (24 bit-MACs), against
// 8 operations per 32 bit-MACs for the op's 4-bit groups (index, sign fix-up and lookup).
// vpermps throughput (one per cycle) is the bound: kernels/README.md.
static constexpr BinaryLayout kBinaryAvx2Layout = {3, 10, 8};

// Each column's K sign bits are one bit stream in both layouts (32 or 30 rows per word), so a
// repack cuts the stream into 30-bit words and regroups the columns by 8.
static void binary_repack(const uint32_t* bits, int64_t K, int64_t N, uint32_t* out) {
  const int64_t KW = (K + 31) / 32, KW3 = (K + 29) / 30;
  for (int64_t n = 0; n < N; ++n) {
    const uint32_t* in = bits + (n / 16) * KW * 16 + n % 16;  // word w of column n: in[16 * w]
    uint32_t* o = out + (n / 8) * KW3 * 8 + n % 8;
    for (int64_t w = 0; w < KW3; ++w) {
      const int64_t bit = 30 * w, q = bit / 32, s = bit % 32;
      uint64_t v = in[16 * q];
      if (q + 1 < KW) v |= (uint64_t)in[16 * (q + 1)] << 32;
      o[8 * w] = (uint32_t)(v >> s) & 0x3FFFFFFFu;
    }
  }
  for (int64_t n = N; n < (N + 7) / 8 * 8; ++n)
    for (int64_t w = 0; w < KW3; ++w) out[(n / 8) * KW3 * 8 + w * 8 + n % 8] = 0;
}

static void binary_lut(const float* x, int64_t K, int64_t KW, float* lut) {
  // entry e = s0 x0 + s1 x1 + s2 x2 with s_i = +1 where bit i of e is set
  const __m256 s0 = _mm256_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1), s1 = _mm256_setr_ps(-1, -1, 1, 1, -1, -1, 1, 1),
               s2 = _mm256_setr_ps(-1, -1, -1, -1, 1, 1, 1, 1);
  for (int64_t g = 0; g < KW * 10; ++g) {
    const int64_t k = 3 * g;
    const float x0 = k < K ? x[k] : 0.0f, x1 = k + 1 < K ? x[k + 1] : 0.0f, x2 = k + 2 < K ? x[k + 2] : 0.0f;
    const __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(s0, _mm256_set1_ps(x0)), _mm256_mul_ps(s1, _mm256_set1_ps(x1))),
                                   _mm256_mul_ps(s2, _mm256_set1_ps(x2)));
    _mm256_storeu_ps(lut + g * 8, v);
  }
}

// RT rows x CB column blocks of 8.
template <int RT, int CB>
static inline void binary_tile(const BinaryParams& p, int64_t m, int64_t cb) {
  const int64_t G = p.KW * 10 * 8;
  __m256 acc[RT][CB];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CB; ++c) acc[r][c] = _mm256_setzero_ps();
  const uint32_t* wb = p.bits + cb * p.KW * 8;
  const float* lut[RT];
  for (int r = 0; r < RT; ++r) lut[r] = p.lut + (m + r) * G;
  const char* next = reinterpret_cast<const char*>(wb + CB * p.KW * 8);
  for (int64_t w = 0; w < p.KW; ++w) {
    if constexpr (RT == 1) prefetch_l2(next + w * CB * 32, CB * 32);  // GEMV: stream the next tile
    __m256i W[CB];
    for (int c = 0; c < CB; ++c) W[c] = _mm256_loadu_si256((const __m256i*)(wb + (c * p.KW + w) * 8));
#pragma GCC unroll 10
    for (int g = 0; g < 10; ++g) {
      __m256i idx[CB];
      for (int c = 0; c < CB; ++c) idx[c] = _mm256_srli_epi32(W[c], 3 * g);
      for (int r = 0; r < RT; ++r) {
        const __m256 L = _mm256_loadu_ps(lut[r] + (w * 10 + g) * 8);
        for (int c = 0; c < CB; ++c) acc[r][c] = _mm256_add_ps(acc[r][c], _mm256_permutevar8x32_ps(L, idx[c]));
      }
    }
  }
  for (int c = 0; c < CB; ++c) {
    const int64_t n0 = (cb + c) * 8, valid = std::min<int64_t>(8, p.N - n0);
    for (int r = 0; r < RT; ++r) {
      alignas(32) float out[8];
      _mm256_store_ps(out, acc[r][c]);
      float* y = p.y + (m + r) * p.N + n0;
      for (int64_t l = 0; l < valid; ++l) y[l] = out[l] * p.alpha[n0 + l] + (p.bias ? p.bias[n0 + l] : 0.0f);
    }
  }
}

// Tiles of 3 rows x 3 blocks (9 vpermps per 3 LUT loads and 3 shifts) measured fastest for M = 128;
// GEMV streams 4 blocks per row. Column chunks of ~256 KB of weights (a multiple of 12 blocks) stay in
// L2 while the row tiles pass; each chunk streams the LUT rows once.
static void binary_gemm(const BinaryParams& p, int64_t m0, int64_t m1, int64_t c0, int64_t c1) {
  tile_grid<3, 3, 4, true>(m0, m1, c0, c1, std::max<int64_t>(12, (256 * 1024) / (p.KW * 32) / 12 * 12),
                           [&](auto rt, auto cb, int64_t m, int64_t c) { binary_tile<rt(), cb()>(p, m, c); });
}

// ---------------------------------------------------------------- SparseConv
// Unit strides: the output plane (on the padded width, see g_sparse_conv_plane_t) in chunks of up
// to 14 registers (two left for the broadcast value and a load); a chunk stays in registers over
// all of the channel's nonzeros, so a nonzero costs R loads + R FMAs and no accumulator traffic.
// Chunks are read and written in whole registers: up to 7 floats past the plane, which the padded
// image's slack and the accumulator's spare floats (SparseConvKernel) cover.
template <ValType VT, class IT, int R>
static void conv_chunk(const SparseConvParams& p, int64_t co, int64_t start, float* acc) {
  const IT* idx = static_cast<const IT*>(p.w.indices);
  __m256 a[R];  // unrolled loops keep a[] in registers (else GCC zeroes and copies it with rep stos/movs)
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_ps();
  for (int64_t e = p.w.col_ptr[co]; e < p.w.col_ptr[co + 1]; ++e) {
    const __m256 v = _mm256_set1_ps(scalar_val<VT>(p.w.values, e));
    const float* src = p.xp + p.offset[idx[e]] + start;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(src + 8 * r), a[r]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc + start + 8 * r, a[r]);
}

template <ValType VT, class IT, int... R>
static void conv_chunk_any(const SparseConvParams& p, int64_t co, int64_t start, int64_t regs, float* acc,
                           std::integer_sequence<int, R...>) {
  using Fn = void (*)(const SparseConvParams&, int64_t, int64_t, float*);
  static constexpr Fn table[] = {conv_chunk<VT, IT, R + 1>...};
  table[regs - 1](p, co, start, acc);
}

// Stores lanes 0..n-1 of v (n < 8) by 4-, 2- and 1-float stores: vmaskmovps, the obvious instruction,
// is microcoded on Zen 3 and cost ~20 % of the MNIST convs' output phase.
static inline void store_first(float* o, __m256 v, int64_t n) {
  __m128 part = _mm256_castps256_ps128(v);
  if (n >= 4) {
    _mm_storeu_ps(o, part);
    part = _mm256_extractf128_ps(v, 1), o += 4, n -= 4;
  }
  if (n >= 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(o), part);
    part = _mm_movehl_ps(part, part), o += 2, n -= 2;
  }
  if (n) _mm_store_ss(o, part);
}

// The output of a conv followed by a folded 2x2 stride-2 MaxPool: per pooled row, 16 sums of each of
// the two conv rows -> scale, bias, ReLU -> vertical max -> max of even and odd lanes -> 8 outputs.
// Reads up to 15 floats past a row's OW (the accumulator's 16 spare floats cover the last row).
static void conv_output_pool2x2(const SparseConvParams& p, int64_t co, const float* acc) {
  const __m256 vs = _mm256_set1_ps(p.w.scales[co]), vb = _mm256_set1_ps(p.w.bias ? p.w.bias[co] : 0.0f);
  const __m256 zero = _mm256_setzero_ps();
  auto activate = [&](int64_t off) {
    const __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(acc + off), vs, vb);
    return p.relu ? _mm256_max_ps(zero, v) : v;  // NaN stays NaN
  };
  auto max_nan = [](__m256 a, __m256 b) {  // max_ps returns b when either is NaN: keep a's NaNs too
    return _mm256_blendv_ps(_mm256_max_ps(a, b), a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  };
  for (int64_t i = 0; i < p.PH; ++i) {
    const int64_t r0 = 2 * i * p.Wp, r1 = r0 + p.Wp;
    float* o = p.y + i * p.PW;
    for (int64_t j = 0; j < p.PW; j += 8) {
      const __m256 lo = max_nan(activate(r0 + 2 * j), activate(r1 + 2 * j));
      const __m256 hi = max_nan(activate(r0 + 2 * j + 8), activate(r1 + 2 * j + 8));
      const __m256 m = max_nan(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0)), _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)));
      const __m256 ordered = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(m), _MM_SHUFFLE(3, 1, 2, 0)));
      if (j + 8 <= p.PW) {
        _mm256_storeu_ps(o + j, ordered);
      } else {
        store_first(o + j, ordered, p.PW - j);
      }
    }
  }
}

// The zero-padded input image, one plane: each row zeroed by whole registers (the last one by
// store_first, so no write crosses into the next plane, which another task may be writing), then its
// input copied in registers of 8, the last one overlapping the one before (rows of >= 8 floats).
// The portable version's per-row memset/memcpy calls cost ~2 us per image on the MNIST CNN's conv2.
static void sparse_conv_pad(const float* s, int64_t H, int64_t W, int64_t pt, int64_t pl, int64_t Hp, int64_t Wp, float* d) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t h = 0; h < Hp; ++h) {
    float* row = d + h * Wp;
    int64_t j = 0;
    for (; j + 8 <= Wp; j += 8) _mm256_storeu_ps(row + j, zero);
    if (j < Wp) store_first(row + j, zero, Wp - j);
    const int64_t sh = h - pt;
    if (sh < 0 || sh >= H) continue;
    const float* src = s + sh * W;
    float* dst = row + pl;
    if (W < 8) {
      std::memcpy(dst, src, (size_t)W * sizeof(float));
      continue;
    }
    for (j = 0; j + 8 <= W; j += 8) _mm256_storeu_ps(dst + j, _mm256_loadu_ps(src + j));
    if (j < W) _mm256_storeu_ps(dst + W - 8, _mm256_loadu_ps(src + W - 8));
  }
}

static void sparse_conv_plane(const SparseConvParams& p, int64_t co, float* acc) {
  if (p.sh != 1 || p.sw != 1) return g_sparse_conv_plane(p, co, acc);
  const int64_t len = p.OH * p.Wp, regs = (len + 7) / 8, chunks = (regs + 13) / 14, per = (regs + chunks - 1) / chunks;
  g_sparse_dispatch(p.w, [&](auto vt, auto it) {
    for (int64_t r = 0; r < regs; r += per)
      conv_chunk_any<decltype(vt)::value, decltype(it)>(p, co, 8 * r, std::min(per, regs - r), acc,
                                                        std::make_integer_sequence<int, 14>{});
  });
  if (p.ph == 2 && p.pw == 2 && p.psh == 2 && p.psw == 2) return conv_output_pool2x2(p, co, acc);
  if (p.ph > 0) return g_sparse_conv_output(p, co, acc, p.Wp);
  // y = acc * scale + bias (then ReLU) row by row, 8 at a time, then a scalar tail
  const float scale = p.w.scales[co], bias = p.w.bias ? p.w.bias[co] : 0.0f;
  const __m256 vs = _mm256_set1_ps(scale), vb = _mm256_set1_ps(bias), zero = _mm256_setzero_ps();
  float* out = p.y;
  for (int64_t oh = 0; oh < p.OH; ++oh) {
    const float* a = acc + oh * p.Wp;
    float* o = out + oh * p.OW;
    int64_t ow = 0;
    for (; ow + 8 <= p.OW; ow += 8) {
      const __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(a + ow), vs, vb);
      _mm256_storeu_ps(o + ow, p.relu ? _mm256_max_ps(zero, v) : v);  // NaN stays NaN
    }
    for (; ow < p.OW; ++ow) {
      const float v = a[ow] * scale + bias;
      o[ow] = p.relu && v < 0.0f ? 0.0f : v;
    }
  }
}

// ---------------------------------------------------------------- Xnor
// RT rows x CB column blocks of 8 (two 4-column ymm halves). AVX2 has no vpopcntq: popcount of each
// byte of x XOR w by two vpshufb nibble lookups, summed per byte for up to 31 words (8 x 31 <= 255),
// then widened per column with vpsadbw.
template <int RT, int CB>
static inline void xnor_tile(const XnorParams& p, int64_t m, int64_t cb) {
  const __m256i nibble_bits = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                               0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
  __m256i total[RT][CB][2];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CB; ++c) total[r][c][0] = total[r][c][1] = zero;
  const uint64_t* wb[CB];
  for (int c = 0; c < CB; ++c) wb[c] = p.bits + (cb + c) * p.KW * 8;
  const char* next = reinterpret_cast<const char*>(wb[0] + CB * p.KW * 8);
  for (int64_t w0 = 0; w0 < p.KW; w0 += 31) {
    const int64_t w1 = std::min<int64_t>(p.KW, w0 + 31);
    __m256i bytes[RT][CB][2];
    for (int r = 0; r < RT; ++r)
      for (int c = 0; c < CB; ++c) bytes[r][c][0] = bytes[r][c][1] = zero;
    for (int64_t w = w0; w < w1; ++w) {
      if constexpr (RT == 1) prefetch_l2(next + w * CB * 64, CB * 64);  // GEMV: stream the next tile
      __m256i W[CB][2];
      for (int c = 0; c < CB; ++c)
        for (int h = 0; h < 2; ++h) W[c][h] = _mm256_loadu_si256((const __m256i*)(wb[c] + w * 8 + h * 4));
      for (int r = 0; r < RT; ++r) {
        const __m256i X = _mm256_set1_epi64x((long long)p.xbits[(m + r) * p.KW + w]);
        for (int c = 0; c < CB; ++c)
          for (int h = 0; h < 2; ++h) {
            const __m256i t = _mm256_xor_si256(X, W[c][h]);
            const __m256i cnt = _mm256_add_epi8(_mm256_shuffle_epi8(nibble_bits, _mm256_and_si256(t, low)),
                                                _mm256_shuffle_epi8(nibble_bits, _mm256_and_si256(_mm256_srli_epi16(t, 4), low)));
            bytes[r][c][h] = _mm256_add_epi8(bytes[r][c][h], cnt);
          }
      }
    }
    for (int r = 0; r < RT; ++r)
      for (int c = 0; c < CB; ++c)
        for (int h = 0; h < 2; ++h) total[r][c][h] = _mm256_add_epi64(total[r][c][h], _mm256_sad_epu8(bytes[r][c][h], zero));
  }
  for (int c = 0; c < CB; ++c) {
    const int64_t n0 = (cb + c) * 8, valid = std::min<int64_t>(8, p.N - n0);
    for (int r = 0; r < RT; ++r) {
      alignas(32) int64_t cnt[8];
      _mm256_store_si256((__m256i*)cnt, total[r][c][0]);
      _mm256_store_si256((__m256i*)(cnt + 4), total[r][c][1]);
      const float beta = p.beta[m + r];
      float* y = p.y + (m + r) * p.N + n0;
      for (int64_t l = 0; l < valid; ++l)
        y[l] = beta * p.alpha[n0 + l] * (float)(p.K - 2 * cnt[l]) + (p.bias ? p.bias[n0 + l] : 0.0f);
    }
  }
}

static void xnor_gemm(const XnorParams& p, int64_t m0, int64_t m1, int64_t c0, int64_t c1) {
  tile_grid<4, 1, 2, false>(m0, m1, c0, c1, std::max<int64_t>(1, (128 * 1024) / (p.KW * 64)),
                      [&](auto rt, auto cb, int64_t m, int64_t c) { xnor_tile<rt(), cb()>(p, m, c); });
}

// ---------------------------------------------------------------- Sparse

// Transposed path: X^T in groups of 32 rows ([group][K][32], 64-byte aligned rows). Per column one
// pass over its entries, each = broadcast value x four 8-float rows; two entries per step into two
// sets of 4 accumulators (an FMA's latency is 4 cycles: one set would wait on it). Measured at
// 4096x4096, M = 128, 90 % sparse: ~1.8 ns per (entry, group) on Zen 3; passes over 16-row halves,
// whose X^T slice fits a 512 KB L2, were no faster.
template <ValType VT, class IT>
static void sparse_xt_t(const SparseParams& p, int64_t t0, int64_t t1, int64_t n0, int64_t n1) {
  const IT* idx = static_cast<const IT*>(p.indices);
  for (int64_t t = t0; t < t1; ++t) {
    const float* xg = p.xt + t * p.K * 32;
    for (int64_t n = n0; n < n1; ++n) {
      __m256 a[4], c[4];
      for (int i = 0; i < 4; ++i) a[i] = c[i] = _mm256_setzero_ps();
      const int64_t e1 = p.col_ptr[n + 1];
      int64_t j = p.col_ptr[n];
      for (; j + 2 <= e1; j += 2) {
        const __m256 v0 = _mm256_set1_ps(scalar_val<VT>(p.values, j));
        const __m256 v1 = _mm256_set1_ps(scalar_val<VT>(p.values, j + 1));
        const float* x0 = xg + (int64_t)idx[j] * 32;
        const float* x1 = xg + (int64_t)idx[j + 1] * 32;
        for (int i = 0; i < 4; ++i) {
          a[i] = _mm256_fmadd_ps(v0, _mm256_load_ps(x0 + 8 * i), a[i]);
          c[i] = _mm256_fmadd_ps(v1, _mm256_load_ps(x1 + 8 * i), c[i]);
        }
      }
      if (j < e1) {
        const __m256 v0 = _mm256_set1_ps(scalar_val<VT>(p.values, j));
        const float* x0 = xg + (int64_t)idx[j] * 32;
        for (int i = 0; i < 4; ++i) a[i] = _mm256_fmadd_ps(v0, _mm256_load_ps(x0 + 8 * i), a[i]);
      }
      const float sc = p.scales[n];
      const float bi = p.bias ? p.bias[n] : 0.0f;
      alignas(32) float out[32];
      for (int i = 0; i < 4; ++i) _mm256_store_ps(out + 8 * i, _mm256_add_ps(a[i], c[i]));
      for (int r = 0; r < 32; ++r) {
        const int64_t m = t * 32 + r;
        if (m >= p.M) break;
        p.y[m * p.N + n] = out[r] * sc + bi;
      }
    }
  }
}

static void sparse_xt(const SparseParams& p, int64_t t0, int64_t t1, int64_t n0, int64_t n1) {
  g_sparse_dispatch(p, [&](auto vt, auto it) { sparse_xt_t<decltype(vt)::value, decltype(it)>(p, t0, t1, n0, n1); });
}

// ---------------------------------------------------------------- Quant
static void quant_x(const float* x, int64_t K, int64_t bs, int64_t nb, int8_t* xq, float* sx, int32_t* sumx) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  alignas(32) float v[128];  // one block, zero padded past K (bs <= 128)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * bs, valid = std::min<int64_t>(bs, K - k0);
    std::memcpy(v, x + k0, valid * sizeof(float));
    std::fill(v + valid, v + bs, 0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (int64_t k = 0; k < bs; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_load_ps(v + k), absmask));
    alignas(32) float m8[8];
    _mm256_store_ps(m8, mx);
    const float amax = *std::max_element(m8, m8 + 8);
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m256i s = _mm256_setzero_si256();
    for (int64_t k = 0; k < bs; k += 8) {
      __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(v + k), inv));  // round to nearest even
      q = _mm256_max_epi32(_mm256_set1_epi32(-127), _mm256_min_epi32(_mm256_set1_epi32(127), q));
      s = _mm256_add_epi32(s, q);
      const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
      _mm_storel_epi64((__m128i*)(xq + k0 + k), _mm_packs_epi16(w16, w16));
    }
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
    sx[b] = amax / 127.0f;
    sumx[b] = _mm_cvtsi128_si32(h);
  }
}

// RT rows x one column block of 16 (two 8-column halves). AVX2 has no vpdpbusd: u8 x s8 byte pairs
// go through vpmaddubsw (int16, saturating) and vpmaddwd. Int4 codes are at most 15, so a pair of
// products is at most 3810 and two groups' sums still fit in int16. Int8 codes w are taken as
// s = w - 128 and multiplied as |s| x (x with the sign of s): a pair is at most 2*128*127 < 32767,
// and sum(w x) = sum(s x) + 128 sum(x).
template <int RT, int BITS, int BS, bool F16S, bool ZP>
static inline void quant_tile(const QuantParams& p, int64_t m, int64_t cb) {
  constexpr int64_t bs = BS, bpb = BS * 2 * BITS;
  const int64_t nb = p.nb, KX = nb * bs;
  const __m256i lo4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
  constexpr int32_t zsym = 1 << (BITS - 1);
  __m256 acc[RT][2];
  for (int r = 0; r < RT; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i d[RT][2];
    for (int r = 0; r < RT; ++r) {
      const int32_t sum = p.sumx[(m + r) * nb + b];
      const int32_t seed = (ZP ? 0 : -zsym * sum) + (BITS == 8 ? 128 * sum : 0);
      d[r][0] = d[r][1] = _mm256_set1_epi32(seed);
    }
    const uint8_t* wb = p.w + (cb * nb + b) * bpb;
    if constexpr (RT == 1) {  // GEMV: stream the next column block's weights and scales into L2
      prefetch_l2(wb + nb * bpb, bpb);
      const int64_t ssz = F16S ? 32 : 64;
      prefetch_l2(static_cast<const char*>(p.scales) + ((cb + 1) * nb + b) * ssz, ssz);
    }
    const int8_t* xb[RT];
    for (int r = 0; r < RT; ++r) xb[r] = p.xq + (m + r) * KX + b * bs;
    if constexpr (BITS == 4) {
#pragma GCC unroll 8
      for (int64_t g = 0; g < bs / 8; g += 2) {  // two groups of 8 K rows per int16 sum
        __m256i lo[2][2], hi[2][2];
        for (int u = 0; u < 2; ++u)
          for (int h = 0; h < 2; ++h) {
            const __m256i raw = _mm256_loadu_si256((const __m256i*)(wb + (g + u) * 64 + h * 32));
            lo[u][h] = _mm256_and_si256(raw, lo4);
            hi[u][h] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), lo4);
          }
        for (int r = 0; r < RT; ++r) {
          __m256i X[2][2];
          for (int u = 0; u < 2; ++u) {
            X[u][0] = _mm256_set1_epi32(load4(xb[r] + 8 * (g + u)));
            X[u][1] = _mm256_set1_epi32(load4(xb[r] + 8 * (g + u) + 4));
          }
          for (int h = 0; h < 2; ++h) {
            const __m256i t0 = _mm256_add_epi16(_mm256_maddubs_epi16(lo[0][h], X[0][0]), _mm256_maddubs_epi16(hi[0][h], X[0][1]));
            const __m256i t1 = _mm256_add_epi16(_mm256_maddubs_epi16(lo[1][h], X[1][0]), _mm256_maddubs_epi16(hi[1][h], X[1][1]));
            d[r][h] = _mm256_add_epi32(d[r][h], _mm256_madd_epi16(_mm256_add_epi16(t0, t1), ones));
          }
        }
      }
    } else {
#pragma GCC unroll 8
      for (int64_t g = 0; g < bs / 4; ++g) {
        __m256i mag[2], sgn[2];
        for (int h = 0; h < 2; ++h) {
          sgn[h] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(wb + g * 64 + h * 32)), flip);
          mag[h] = _mm256_abs_epi8(sgn[h]);
        }
        for (int r = 0; r < RT; ++r) {
          const __m256i X = _mm256_set1_epi32(load4(xb[r] + 4 * g));
          for (int h = 0; h < 2; ++h)
            d[r][h] = _mm256_add_epi32(d[r][h], _mm256_madd_epi16(_mm256_maddubs_epi16(mag[h], _mm256_sign_epi8(X, sgn[h])), ones));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t so = (cb * nb + b) * 16 + h * 8;
      __m256 sw;
      if constexpr (F16S)
        sw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(static_cast<const uint16_t*>(p.scales) + so)));
      else
        sw = _mm256_loadu_ps(static_cast<const float*>(p.scales) + so);
      __m256 zf = _mm256_setzero_ps();
      if constexpr (ZP) zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p.zp + so))));
      for (int r = 0; r < RT; ++r) {
        const int64_t xo = (m + r) * nb + b;
        __m256 f = _mm256_cvtepi32_ps(d[r][h]);
        if constexpr (ZP) f = _mm256_fnmadd_ps(zf, _mm256_set1_ps((float)p.sumx[xo]), f);
        acc[r][h] = _mm256_fmadd_ps(_mm256_mul_ps(f, sw), _mm256_set1_ps(p.sx[xo]), acc[r][h]);
      }
    }
  }
  const int64_t n0 = cb * 16, valid = std::min<int64_t>(16, p.N - n0);
  for (int r = 0; r < RT; ++r) {
    alignas(32) float out[16];
    _mm256_store_ps(out, acc[r][0]);
    _mm256_store_ps(out + 8, acc[r][1]);
    float* y = p.y + (m + r) * p.N + n0;
    for (int64_t l = 0; l < valid; ++l) y[l] = out[l] + (p.bias ? p.bias[n0 + l] : 0.0f);
  }
}

template <int BITS, int BS, bool F16S, bool ZP>
static void quant_gemm_t(const QuantParams& p, int64_t m0, int64_t m1, int64_t c0, int64_t c1) {
  tile_grid<4, 1, 1, false>(m0, m1, c0, c1, std::max<int64_t>(1, (256 * 1024) / (p.nb * BS * 2 * BITS)),
                      [&](auto rt, auto, int64_t m, int64_t c) { quant_tile<rt(), BITS, BS, F16S, ZP>(p, m, c); });
}

static void quant_gemm(const QuantParams& p, int64_t m0, int64_t m1, int64_t c0, int64_t c1) {
  quant_dispatch(p, [&](auto bits, auto bs, auto f16, auto zp) { quant_gemm_t<bits(), bs(), f16(), zp()>(p, m0, m1, c0, c1); });
}
}  // namespace isa_avx2

const KernelTable* GetKernelTableAvx2() {
#if defined(ONNXOPT_HAVE_AVX2)
  using namespace isa_avx2;
  static const KernelTable t = {"avx2", kBinaryAvx2Layout, binary_repack, binary_lut, binary_gemm, g_xnor_pack_x, xnor_gemm,
                                g_sparse_rows<SparseGemv>, sparse_xt,   sparse_csr_acc, g_sparse_panel_input, g_sparse_panels, 0.0f, sparse_conv_plane, sparse_conv_pad, quant_x, quant_gemm};
  return &t;
#else
  return nullptr;
#endif
}
}  // namespace onnxopt
