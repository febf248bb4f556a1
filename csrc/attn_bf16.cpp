// bf16 GEMM pieces of the CPU attention (ops.cpp: attn_fwd / attn_bwd) on AVX512-BF16.
//
// vdpbf16ps multiplies 16 lanes of bf16 *pairs* and adds both products into fp32 accumulators, so
// a GEMM C (m x n, fp32) += A (m x k, bf16) · B (k x n, bf16) wants B "pair-packed": for each pair
// of k indices p = (2p, 2p + 1) and each column j, the 32-bit word (B[2p][j], B[2p+1][j]). A row of
// A is already pair-packed along k (row-major, k contiguous), so a 32-bit broadcast of A[i][2p..]
// meets 16 columns' pairs of B. With 4 rows x 4 vectors (64 columns) of accumulators the loop does
// 16 dot-pair instructions per 4 loads + 4 broadcasts. Odd k: callers pad A with a zero column
// and the packers pad B with a zero row, so every k here is even.
//
// Like the ISA files, this file includes no torch header (see kernels.h); it is compiled for
// avx512bf16 and used only after a run-time check of the CPU (attn_bf16_kernels()).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

namespace fastft {
namespace {

// C[r][j] (+)= Σ_p A32[r][p] · Bp[p][j] for r < MR, j in [j0, j0 + 16·NV) (the last vector masked).
template <int MR, int NV>
inline void micro(const uint16_t* A, int64_t lda, const uint32_t* Bp, int64_t ldb, float* C, int64_t ldc, int64_t kp,
                  int64_t j0, __mmask16 last, bool acc) {
  __m512 c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; ++p) {
    __m512i b[NV];
    for (int v = 0; v < NV; ++v) {
      const uint32_t* src = Bp + p * ldb + j0 + 16 * v;
      b[v] = v == NV - 1 ? _mm512_maskz_loadu_epi32(last, src) : _mm512_loadu_si512(src);
    }
    for (int r = 0; r < MR; ++r) {
      uint32_t w;
      std::memcpy(&w, A + r * lda + 2 * p, 4);
      const __m512i a = _mm512_set1_epi32(static_cast<int>(w));
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], (__m512bh)a, (__m512bh)b[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* dst = C + r * ldc + j0 + 16 * v;
      const __mmask16 m = v == NV - 1 ? last : static_cast<__mmask16>(0xFFFF);
      __m512 x = c[r][v];
      if (acc) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, dst));
      _mm512_mask_storeu_ps(dst, m, x);
    }
}

template <int MR>
inline void row_block(const uint16_t* A, int64_t lda, const uint32_t* Bp, int64_t ldb, float* C, int64_t ldc, int64_t n,
                      int64_t kp, bool acc) {
  for (int64_t j0 = 0; j0 < n; j0 += 64) {
    const int64_t w = std::min<int64_t>(64, n - j0);
    const int nv = static_cast<int>((w + 15) / 16);
    const int tail = static_cast<int>(w - 16 * (nv - 1));
    const __mmask16 last = static_cast<__mmask16>((1u << tail) - 1u);
    switch (nv) {
      case 1: micro<MR, 1>(A, lda, Bp, ldb, C, ldc, kp, j0, last, acc); break;
      case 2: micro<MR, 2>(A, lda, Bp, ldb, C, ldc, kp, j0, last, acc); break;
      case 3: micro<MR, 3>(A, lda, Bp, ldb, C, ldc, kp, j0, last, acc); break;
      default: micro<MR, 4>(A, lda, Bp, ldb, C, ldc, kp, j0, last, acc); break;
    }
  }
}

void gemm(const uint16_t* A, int64_t lda, const uint32_t* Bp, int64_t ldb, float* C, int64_t ldc, int64_t m, int64_t n,
          int64_t k, bool acc) {
  const int64_t kp = k / 2;  // k is even (see the file comment)
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) row_block<4>(A + i * lda, lda, Bp, ldb, C + i * ldc, ldc, n, kp, acc);
  switch (m - i) {
    case 3: row_block<3>(A + i * lda, lda, Bp, ldb, C + i * ldc, ldc, n, kp, acc); break;
    case 2: row_block<2>(A + i * lda, lda, Bp, ldb, C + i * ldc, ldc, n, kp, acc); break;
    case 1: row_block<1>(A + i * lda, lda, Bp, ldb, C + i * ldc, ldc, n, kp, acc); break;
    default: break;
  }
}

// B = X (rows x cols, row-major, ld ldx): out[p][j] = (X[2p][j], X[2p+1][j]), X[rows][.] = 0 when
// rows is odd. out has ceil(rows / 2) rows of `cols` words.
void pack_rows(const uint16_t* X, int64_t ldx, int64_t rows, int64_t cols, uint32_t* out) {
  for (int64_t p = 0; p < (rows + 1) / 2; ++p) {
    const uint16_t* r0 = X + 2 * p * ldx;
    const bool has1 = 2 * p + 1 < rows;
    const uint16_t* r1 = X + (2 * p + 1) * ldx;
    uint32_t* o = out + p * cols;
    int64_t j = 0;
    for (; j + 16 <= cols; j += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + j)));
      const __m512i hi = has1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + j)))
                              : _mm512_setzero_si512();
      _mm512_storeu_si512(o + j, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
    for (; j < cols; ++j) o[j] = static_cast<uint32_t>(r0[j]) | (has1 ? static_cast<uint32_t>(r1[j]) << 16 : 0u);
  }
}

// B = Xᵀ for X (rows x cols, row-major, cols even): out[p][j] = (X[j][2p], X[j][2p+1]), i.e. the
// 32-bit words of X transposed. out has cols / 2 rows of `rows` words.
void pack_cols(const uint16_t* X, int64_t ldx, int64_t rows, int64_t cols, uint32_t* out) {
  const int64_t np = cols / 2;
  for (int64_t j = 0; j < rows; ++j) {
    const uint16_t* src = X + j * ldx;
    for (int64_t p = 0; p < np; ++p) {
      uint32_t w;
      std::memcpy(&w, src + 2 * p, 4);
      out[p * rows + j] = w;
    }
  }
}

// fp32 rows -> bf16 (round to nearest even), dst row length `cols_pad` >= cols zero-filled past cols.
void to_bf16(const float* src, int64_t lds, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd, int64_t cols_pad) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    uint16_t* d = dst + r * ldd;
    int64_t j = 0;
    for (; j + 16 <= cols; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + j)));
    if (j < cols) {
      const __mmask16 m = static_cast<__mmask16>((1u << (cols - j)) - 1u);
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, s + j));
      _mm256_mask_storeu_epi16(d + j, m, v);
    }
    for (j = cols; j < cols_pad; ++j) d[j] = 0;
  }
}

// bf16 X (rows x cols) -> Xᵀ (cols x rows_pad, ld ldd), zero-filled past rows; 16 x 16 tiles.
void transpose16(const uint16_t* X, int64_t ldx, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd, int64_t rows_pad) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16)
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t r1 = std::min(rows, r0 + 16), c1 = std::min(cols, c0 + 16);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = X[r * ldx + c];
    }
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = rows; r < rows_pad; ++r) dst[c * ldd + r] = 0;
}

// Exact round-to-nearest-even fp32 -> bf16 of 16 lanes (torch's conversion: subnormals kept,
// NaN -> quiet NaN), unlike vcvtneps2bf16 which flushes subnormal inputs.
inline __m256i rne16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// dst[r][c] = bf16(scale · src[r][c]) for an output block (the final rounding of O / dQ).
void store_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, float scale, uint16_t* dst, int64_t ldd) {
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * ldd + c), rne16(_mm512_mul_ps(_mm512_loadu_ps(src + r * lds + c), vs)));
    if (c < cols) {
      const __mmask16 m = static_cast<__mmask16>((1u << (cols - c)) - 1u);
      _mm256_mask_storeu_epi16(dst + r * ldd + c, m, rne16(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, src + r * lds + c), vs)));
    }
  }
}

// dst[r][c] = bf16(scale · src[c][r]): the fp32 Kᵀ / Vᵀ gradient accumulators (cols x rows) to
// dK / dV rows, 16 x 16 tiles through a small buffer.
void store_t(const float* src, int64_t lds, int64_t rows, int64_t cols, float scale, uint16_t* dst, int64_t ldd) {
  alignas(64) float tile[16 * 16];
  for (int64_t r0 = 0; r0 < rows; r0 += 16)
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t nr = std::min<int64_t>(16, rows - r0), nc = std::min<int64_t>(16, cols - c0);
      for (int64_t c = 0; c < nc; ++c)
        for (int64_t r = 0; r < nr; ++r) tile[r * 16 + c] = src[(c0 + c) * lds + r0 + r];
      store_rows(tile, 16, nr, nc, scale, dst + r0 * ldd + c0, ldd);
    }
}

const AttnBf16Kernels kBf16 = {gemm, pack_rows, pack_cols, to_bf16, transpose16, store_rows, store_t};

}  // namespace

const AttnBf16Kernels* attn_bf16_kernels_compiled() { return &kBf16; }
}  // namespace fastft
#else
namespace fastft {
const AttnBf16Kernels* attn_bf16_kernels_compiled() { return nullptr; }
}  // namespace fastft
#endif
