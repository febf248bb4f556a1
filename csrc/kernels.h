// fastft CPU kernels: the ISA-independent interface.
//
// The inner loops live in isa_kernels.inc, compiled three times (isa_avx512.cpp, isa_avx2.cpp,
// isa_scalar.cpp) under different `#pragma GCC target`s; `kernels()` picks one table at run time
// from the CPU's features (or FASTFT_CPU_ISA=avx512|avx2|scalar). The ISA files include no torch
// headers on purpose: an inline function from a shared header compiled under an AVX-512 target
// could be picked by the linker for every caller (an ODR clash that would fault on older CPUs).
//
// Everything here takes raw pointers and element indices into the row-major flattened weight;
// the ATen glue (ops.cpp, matmul.cpp) owns shapes, dtypes, allocation and threading.
#pragma once

#include <cstdint>

namespace fastft {

// Output element types of dequantization. Half types travel as raw bits (uint16_t).
enum class OutType : int { F32 = 0, BF16 = 1, F16 = 2 };

struct KernelTable {
  const char* name;

  // NF4 dequantize elements [start, start + len) of the flattened weight into out[0 .. len).
  // `data` is the whole packed weight (two codes per byte, element 2i in the high nibble of byte
  // i); `absmax` holds the fp32 scale of blocks first_block, first_block + 1, ... (one per
  // `blocksize` elements, indexed by (start + j) / blocksize - first_block); `lut` the 16 codes.
  // y = lut[code] * absmax in fp32, then one round-to-nearest-even cast to the output type.
  // `stream`: use non-temporal stores where aligned (outputs much larger than the caches; the
  // AVX-512 table only, others ignore it).
  void (*nf4_dequant)(const uint8_t* data, int64_t start, int64_t len, const float* absmax,
                      int64_t first_block, int64_t blocksize, const float* lut, void* out, OutType t,
                      bool stream);

  // NF4 quantize `nblocks` whole blocks of fp32 input x (blocksize even), writing
  // nblocks * blocksize / 2 bytes and nblocks absmax. The rule (fastft/quant/nf4.py, as
  // bitsandbytes): absmax = max|x|; scaled = clamp(x * (1 / max(absmax, 1e-38)), -1, 1);
  // code = #{fp32 midpoints < scaled}. A block holding inf or NaN gets absmax = NaN (the caller
  // turns that into an error).
  void (*nf4_quant_blocks)(const float* x, int64_t nblocks, int64_t blocksize, const float* mids,
                           uint8_t* packed, float* absmax);

  // One block of `len` elements quantized to a sorted codebook given by its nmids midpoints in
  // float64 (exact for fp32 codes, so the code is the exactly nearest one, ties low): the 8-bit
  // dynamic map of double quantization, or an NF4 tail block. One code per byte; same scaling rule.
  void (*quant_codebook_block)(const float* x, int64_t len, const double* mids, int64_t nmids,
                               uint8_t* codes, float* absmax);

  // Int4 dequantize one row segment: columns [c0, c0 + len) of a row whose packed bytes start at
  // `row` (even column in the high nibble); scales / zeros are that row's per-group values
  // (zeros may be null: symmetric). y = (q - zero) * scale, or (q - 8) * scale when symmetric.
  void (*int4_dequant_row)(const uint8_t* row, int64_t c0, int64_t len, const float* scales,
                           const float* zeros, int64_t group_size, void* out, OutType t);

  // acc[m] += dot(w[0 .. len), x[m * ldx .. m * ldx + len)) for m < M, fp32 with per-lane partial
  // sums (fused multiply-add where the ISA has it). The inner product of the small-M quant-matmul,
  // whose w is a just-dequantized, L1-resident piece of one weight row.
  void (*dot_rows)(const float* w, int64_t len, const float* x, int64_t ldx, int64_t M, float* acc);

  // Cross-entropy of one row of `len` logits z (fp32 or bf16, t F32 / BF16) against class
  // `target`: returns lse(z) - z[target] = (m - z[target]) + log Σ e^(z - m) with m = max z
  // (fp32), and overwrites z with its gradient softmax(z) - onehot(target) = e^(z - m) / Σ - onehot,
  // rounded once to z's type (z - m is exact-ish, so no fp32 lse rounding enters the softmax). target < 0: an ignored row, z becomes 0
  // and the loss is 0. Max, sum of exponentials and the gradient are three passes over the row.
  float (*ce_row)(void* z, int64_t len, int64_t target, OutType t);

  // Attention on CPU, one query row of fp32 scores s = q·kᵀ (unscaled) against `width` keys of
  // which the first `len` are visible (causal masking; len may be 0). Forward: s becomes
  // softmax(scale·s) (0 on hidden keys); returns the log-sum-exp of scale·s (-inf if len == 0).
  // Backward: s becomes P = exp(scale·s - lse) and dp (dO·vᵀ) becomes dS = P·(dp - di).
  float (*attn_softmax_row)(float* s, int64_t len, int64_t width, float scale);
  void (*attn_grad_row)(float* s, float* dp, int64_t len, int64_t width, float scale, float lse, float di);

  // Fused rows of the transformer block (fp32 or bf16, t F32 / BF16; x, w, y of one type).
  // RMSNorm with HF's rounding (normalise in fp32, round, multiply by w): returns 1/rms.
  float (*rmsnorm_row)(const void* x, const void* w, void* y, int64_t H, float eps, OutType t);
  // Its input gradient for a frozen w: dx = r·dn - (r³/H)·x·Σ dn·x with dn = dy·w.
  void (*rmsnorm_bwd_row)(const void* dy, const void* x, const void* w, float r, void* dx, int64_t H, OutType t);
  // SwiGLU's y = silu(g)·u (silu rounded first, as torch does) and its gradients dg, du.
  void (*silu_mul_row)(const void* g, const void* u, void* y, int64_t n, OutType t);
  void (*silu_mul_bwd_row)(const void* dy, const void* g, const void* u, void* dg, void* du, int64_t n, OutType t);
  // Rotary embedding of one position (nheads x D values; cos / sin of length d <= D, d even,
  // the tail past d copied): forward, or its transpose for the backward (bwd).
  void (*rope_row)(const void* x, const void* cs, const void* sn, void* y, int64_t nheads, int64_t D, int64_t d, bool bwd,
                   OutType t);
};

// bf16 GEMM pieces of the CPU attention (attn_bf16.cpp, AVX512-BF16 vdpbf16ps). "Pair-packed" B:
// word [p][j] holds (B[2p][j], B[2p+1][j]) as two bf16 (low half first); k is always even.
struct AttnBf16Kernels {
  // C (m x n, fp32, ldc) = or += (acc) A (m x k, bf16 row-major, lda) · B (pair-packed, ldb words per p).
  void (*gemm)(const uint16_t* A, int64_t lda, const uint32_t* Bp, int64_t ldb, float* C, int64_t ldc, int64_t m,
               int64_t n, int64_t k, bool acc);
  // Pair-pack B = X (rows x cols): ceil(rows / 2) x cols words, a zero row added when rows is odd.
  void (*pack_rows)(const uint16_t* X, int64_t ldx, int64_t rows, int64_t cols, uint32_t* out);
  // Pair-pack B = Xᵀ for X (rows x cols, cols even): cols / 2 x rows words.
  void (*pack_cols)(const uint16_t* X, int64_t ldx, int64_t rows, int64_t cols, uint32_t* out);
  // fp32 rows -> bf16 (round to nearest even), each dst row zero-filled from cols to cols_pad.
  void (*to_bf16)(const float* src, int64_t lds, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd, int64_t cols_pad);
  // bf16 X (rows x cols) -> Xᵀ (cols x rows_pad), zero-filled from rows to rows_pad.
  void (*transpose16)(const uint16_t* X, int64_t ldx, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd,
                      int64_t rows_pad);
  // dst[r][c] = bf16(scale · src[r][c]), torch's exact rounding (subnormals kept).
  void (*store_rows)(const float* src, int64_t lds, int64_t rows, int64_t cols, float scale, uint16_t* dst, int64_t ldd);
  // dst[r][c] = bf16(scale · src[c][r]) (src holds the transpose, cols x rows, ld lds).
  void (*store_t)(const float* src, int64_t lds, int64_t rows, int64_t cols, float scale, uint16_t* dst, int64_t ldd);
};
// The compiled table (nullptr on non-x86 builds); callers also check the CPU (avx512bf16).
const AttnBf16Kernels* attn_bf16_kernels_compiled();

// The table for this machine (cached after the first call).
const KernelTable& kernels();
// Force a table by name ("avx512", "avx2", "scalar", or "auto"); returns false if the CPU cannot
// run it. Used by tests to cover every path on one machine.
bool set_isa(const char* name);
// Names of the tables this CPU can run, best first, and whether each was compiled in.
const KernelTable* table_avx512();
const KernelTable* table_avx2();
const KernelTable* table_scalar();

}  // namespace fastft
