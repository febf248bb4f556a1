// fastft._C: ATen glue for the CPU kernels. Shapes, dtype checks, allocation and OpenMP
// threading (at::parallel_for) live here; the per-ISA inner loops are in isa_kernels.inc.
//
// Ops (schemas are declared in fastft/ops/cpp.py, which also registers the fake kernels and the
// autograd formula; this file registers the CPU implementations under TORCH_LIBRARY_IMPL):
//   nf4_quantize(w, blocksize) -> (packed ((n+1)//2, 1) uint8, absmax (nblocks,) fp32)
//   quantize_blockwise_8bit(x, code, blocksize) -> (codes uint8, absmax fp32)   [double quant]
//   dequantize_blockwise_8bit(q, absmax, code, blocksize, offset) -> fp32
//   nf4_dequantize(data, absmax, quant_map, nested_absmax?, nested_quant_map?, offset, blocksize,
//                  nested_blocksize, shape, dtype) -> Tensor(shape, dtype)
//   nf4_dequantize_out(<same>, out)       into a preallocated contiguous buffer
//   nf4_matmul(x, bias?, <quant args>, out_features, in_features) -> x @ Wᵀ + bias
//   nf4_matmul_grad_x(grad, <quant args>, out_features, in_features) -> grad @ W
//   int4_quantize / int4_dequantize / int4_matmul / int4_matmul_grad_x likewise.
//
// Quant-matmul strategy ("tiled", the default): split W into tiles that hold the whole reduction
// dimension (row tiles of W for the forward, column tiles for dX), dequantize one tile into a
// per-thread buffer that stays in L2/L3, and hand it straight to the BLAS (at::mm, MKL/oneDNN,
// single-threaded inside our parallel region). Because every tile carries the full reduction, each
// output element is one BLAS dot product, rounded once, as in torch's x @ W_deqᵀ. The alternative
// ("full": dequantize all of W into one scratch buffer, then one multi-threaded at::mm) writes the
// full-precision weight to memory; benchmarks/bench_cpu.py measures both.
// Lean headers (not torch/extension.h, which pulls in all of libtorch's C++ API and doubles the
// compile time): ATen, the op registration API and bare pybind11 for the few module functions.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"

// The ATen calls inside these ops are their implementation, not the caller's computation: under CPU
// autocast (whose dispatch keys stay set while a custom op runs, and only on the calling thread of an
// OpenMP team) at::mm would silently switch some blocks to bf16. Each op entry that calls ATen
// matmuls holds one of these.
#define FASTFT_NO_AUTOCAST c10::impl::ExcludeDispatchKeyGuard fastft_no_autocast_(c10::autocast_dispatch_keyset)

namespace fastft {

// --------------------------------------------------------------------------------------------
// ISA selection
// --------------------------------------------------------------------------------------------
static bool cpu_can_run(const std::string& name) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (name == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("bmi2");
#endif
  return name == "scalar";
}

static const KernelTable* table_by_name(const std::string& name) {
  const KernelTable* t = nullptr;
  if (name == "avx512") t = table_avx512();
  else if (name == "avx2") t = table_avx2();
  else if (name == "scalar") t = table_scalar();
  return (t && cpu_can_run(name)) ? t : nullptr;
}

static const KernelTable* best_table() {
  if (const char* env = std::getenv("FASTFT_CPU_ISA")) {
    std::string e(env);
    if (!e.empty() && e != "auto") {
      const KernelTable* t = table_by_name(e);
      TORCH_CHECK(t != nullptr, "FASTFT_CPU_ISA=", e, " is not one this CPU can run (avx512, avx2, scalar, auto)");
      return t;
    }
  }
  for (const char* n : {"avx512", "avx2", "scalar"})
    if (const KernelTable* t = table_by_name(n)) return t;
  return table_scalar();
}

static std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable& kernels() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    t = best_table();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

bool set_isa(const char* name) {
  if (std::string(name) == "auto") {
    g_table.store(best_table());
    return true;
  }
  const KernelTable* t = table_by_name(name);
  if (!t) return false;
  g_table.store(t);
  return true;
}

// Tunables for the quant-matmul (set from Python by the benchmark; defaults measured there).
static std::atomic<int> g_strategy{0};                  // 0 tiled, 1 full scratch
static std::atomic<int64_t> g_tile_elems{1 << 18};      // weight elements per dequantized tile
static std::atomic<int64_t> g_fused_max_m{8};           // rows of x up to which the fused dot kernel runs

// --------------------------------------------------------------------------------------------
// Helpers
// --------------------------------------------------------------------------------------------
// The NF4 codebook (DESIGN.md "Formats"); quantization uses the fp32 midpoints of adjacent codes.
static const float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

static std::vector<float> midpoints(const float* code, int64_t n) {
  std::vector<float> m(n - 1);
  for (int64_t i = 0; i + 1 < n; ++i) m[i] = (code[i] + code[i + 1]) / 2.0f;  // fp32, as torch does
  return m;
}

static OutType out_type(at::ScalarType s, const char* op) {
  switch (s) {
    case at::kFloat: return OutType::F32;
    case at::kBFloat16: return OutType::BF16;
    case at::kHalf: return OutType::F16;
    default: TORCH_CHECK(false, op, ": dtype must be float32, bfloat16 or float16, got ", s);
  }
}

static void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Waking OpenMP threads costs ~10 us, and far more on a loaded machine where they spin against
// other processes; work below this many element-operations per thread runs on the caller alone.
constexpr int64_t kMinWorkPerThread = 1 << 17;
// Dequantized outputs at least this large bypass the caches (see nf4_dequant_all); settable from
// Python (tests force both paths, the benchmark measures both).
static std::atomic<int64_t> g_stream_bytes{16 << 20};

// Grain (in items) for at::parallel_for when each item costs `work` element-operations.
static int64_t grain_for(int64_t work) { return std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, work)); }

// Converts elements [e0, e1) of a float tensor (fp32 / bf16 / fp16) to fp32 in `dst`.
static void to_f32(const at::Tensor& w, int64_t e0, int64_t e1, float* dst) {
  switch (w.scalar_type()) {
    case at::kFloat: std::memcpy(dst, w.const_data_ptr<float>() + e0, (e1 - e0) * sizeof(float)); break;
    case at::kBFloat16: {
      const at::BFloat16* p = w.const_data_ptr<at::BFloat16>() + e0;
      for (int64_t i = 0; i < e1 - e0; ++i) dst[i] = static_cast<float>(p[i]);
      break;
    }
    case at::kHalf: {
      const at::Half* p = w.const_data_ptr<at::Half>() + e0;
      for (int64_t i = 0; i < e1 - e0; ++i) dst[i] = static_cast<float>(p[i]);
      break;
    }
    default: TORCH_CHECK(false, "unreachable");
  }
}

// Per-block absmax of an NF4 weight, plain fp32 or double-quantized
// (absmax_b = nested_code[q_b] * nested_absmax[b / nested_blocksize] + offset, in fp32).
struct AbsmaxSource {
  const float* f32 = nullptr;
  const uint8_t* q8 = nullptr;
  const float* nested = nullptr;
  const float* ncode = nullptr;
  float offset = 0.0f;
  int64_t nbs = 256;

  void fill(int64_t b0, int64_t b1, float* out) const {
    for (int64_t g = b0 / nbs, b = b0; b < b1; ++g) {  // nested group by group: no division per block
      const float s = nested[g];
      for (const int64_t ge = std::min(b1, (g + 1) * nbs); b < ge; ++b) {
        const float v = ncode[q8[b]] * s;
        out[b - b0] = v + offset;  // separate add: -ffp-contract=off keeps this from fusing
      }
    }
  }
};

struct NF4View {
  const uint8_t* data;
  int64_t n, bs, nblocks;
  const float* lut;
  AbsmaxSource am;
};

static NF4View nf4_view(const char* op, const at::Tensor& data, const at::Tensor& absmax, const at::Tensor& quant_map,
                        const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_quant_map,
                        double offset, int64_t blocksize, int64_t nested_blocksize, int64_t n) {
  for (auto* p : {&data, &absmax, &quant_map}) check_cpu(*p, op, "quantized weight tensors");
  TORCH_CHECK(blocksize >= 2 && blocksize % 2 == 0 && blocksize <= 4096, op, ": blocksize must be even and in [2, 4096], got ", blocksize);
  TORCH_CHECK(n >= 0, op, ": negative number of elements");
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous() && data.numel() == (n + 1) / 2, op,
              ": data must be contiguous uint8 with (n + 1) // 2 = ", (n + 1) / 2, " bytes, got ", data.scalar_type(), " ", data.sizes());
  TORCH_CHECK(quant_map.scalar_type() == at::kFloat && quant_map.numel() == 16 && quant_map.is_contiguous(), op,
              ": quant_map must be 16 contiguous fp32 codes");
  NF4View v{data.const_data_ptr<uint8_t>(), n, blocksize, ceil_div(n, blocksize), quant_map.const_data_ptr<float>(), {}};
  TORCH_CHECK(absmax.numel() == v.nblocks && absmax.is_contiguous(), op, ": absmax must hold ", v.nblocks,
              " contiguous values (one per block), got ", absmax.sizes());
  TORCH_CHECK(nested_absmax.has_value() == nested_quant_map.has_value(), op,
              ": nested_absmax and nested_quant_map come together");
  if (nested_absmax.has_value()) {
    const auto& na = *nested_absmax;
    const auto& nc = *nested_quant_map;
    check_cpu(na, op, "nested_absmax");
    check_cpu(nc, op, "nested_quant_map");
    TORCH_CHECK(absmax.scalar_type() == at::kByte, op, ": double-quantized absmax must be uint8, got ", absmax.scalar_type());
    TORCH_CHECK(nested_blocksize >= 1, op, ": nested_blocksize must be positive");
    TORCH_CHECK(na.scalar_type() == at::kFloat && na.is_contiguous() && na.numel() == ceil_div(v.nblocks, nested_blocksize), op,
                ": nested_absmax must be ", ceil_div(v.nblocks, nested_blocksize), " contiguous fp32 values");
    TORCH_CHECK(nc.scalar_type() == at::kFloat && nc.is_contiguous() && nc.numel() == 256, op,
                ": nested_quant_map must be 256 contiguous fp32 codes");
    v.am.q8 = absmax.const_data_ptr<uint8_t>();
    v.am.nested = na.const_data_ptr<float>();
    v.am.ncode = nc.const_data_ptr<float>();
    v.am.offset = static_cast<float>(offset);
    v.am.nbs = nested_blocksize;
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, op, ": absmax must be fp32 without double quantization, got ", absmax.scalar_type());
    v.am.f32 = absmax.const_data_ptr<float>();
  }
  return v;
}

// Freed large outputs kept for reuse, keyed by their exact (2 MiB-rounded) size. Training calls
// the same ops on the same layer shapes every step (dequantize a layer's weight, quant-matmul
// outputs of a big model), so a reused buffer skips both the first-touch page faults of fresh
// memory and the kernel's huge-page compaction, which can stall a fresh madvised buffer for tens of
// milliseconds on a fragmented machine. Bounded (g_reuse_cap bytes held while free); a buffer that
// would exceed it is returned to the system. Leaked on purpose: tensors may die after static
// destructors at interpreter exit.
struct ReuseCache {
  std::mutex m;
  std::vector<std::pair<size_t, void*>> held;
  size_t bytes = 0;
};
static std::atomic<int64_t> g_reuse_cap{256 << 20};
static ReuseCache& reuse_cache() {
  static ReuseCache* c = new ReuseCache();
  return *c;
}
static void* reuse_take(size_t sz) {
  ReuseCache& c = reuse_cache();
  std::lock_guard<std::mutex> g(c.m);
  for (size_t i = 0; i < c.held.size(); ++i)
    if (c.held[i].first == sz) {
      void* p = c.held[i].second;
      c.held.erase(c.held.begin() + static_cast<std::ptrdiff_t>(i));
      c.bytes -= sz;
      return p;
    }
  return nullptr;
}
static void reuse_give(void* p, size_t sz) {
  {
    ReuseCache& c = reuse_cache();
    std::lock_guard<std::mutex> g(c.m);
    if (c.bytes + sz <= static_cast<size_t>(std::max<int64_t>(0, g_reuse_cap.load()))) {
      c.held.emplace_back(sz, p);
      c.bytes += sz;
      return;
    }
  }
  std::free(p);
}
static void reuse_clear() {
  ReuseCache& c = reuse_cache();
  std::lock_guard<std::mutex> g(c.m);
  for (auto& e : c.held) std::free(e.second);
  c.held.clear();
  c.bytes = 0;
}

// A new output tensor; large ones come from the reuse cache above or are backed by transparent
// huge pages where the kernel offers them (madvise mode). A fresh 64 MiB buffer otherwise takes
// 16384 page faults on first touch, which costs several times the dequantization itself; with
// 2 MiB pages it takes 32. The storage is an ordinary CPU tensor whose deleter hands the buffer
// back to the cache (only resizing it in place is not supported).
static at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  const int64_t nbytes = c10::multiply_integers(shape) * static_cast<int64_t>(c10::elementSize(opts.dtype().toScalarType()));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr int64_t kHuge = 2 << 20;
  if (nbytes >= 4 * kHuge) {
    const size_t sz = static_cast<size_t>((nbytes + kHuge - 1) / kHuge * kHuge);
    void* p = reuse_take(sz);
    if (p == nullptr && (p = std::aligned_alloc(kHuge, sz)) != nullptr)
      (void)madvise(p, sz, MADV_HUGEPAGE);  // best effort: without THP these are ordinary pages
    if (p != nullptr) return at::from_blob(p, shape, [sz](void* q) { reuse_give(q, sz); }, opts);
  }
#endif
  return at::empty(shape, opts);
}

static int64_t numel_of(at::IntArrayRef shape) {
  int64_t n = 1;
  for (auto s : shape) {
    TORCH_CHECK(s >= 0, "negative dimension in shape ", shape);
    n *= s;
  }
  return n;
}

// Dequantizes the whole weight into `out` (contiguous, n elements of type t), in chunks of whole
// blocks spread over the threads; double-quantized scales are expanded per chunk on the stack.
static void nf4_dequant_all(const NF4View& v, void* out, OutType t, int64_t esize) {
  if (v.n == 0) return;
  // Outputs past the last-level cache are written with streaming stores (no read for ownership):
  // it is what lets dequantization run at the speed of a copy while moving ~half its bytes.
  const bool stream = v.n * esize >= g_stream_bytes.load();
  const int64_t per = std::max<int64_t>(1, 16384 / v.bs);  // blocks per chunk
  const int64_t nchunks = ceil_div(v.nblocks, per);
  const KernelTable& K = kernels();
  at::parallel_for(0, nchunks, grain_for(per * v.bs), [&](int64_t c0, int64_t c1) {
    std::vector<float> buf(v.am.f32 ? 0 : per);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b0 = c * per, b1 = std::min(v.nblocks, b0 + per);
      const int64_t e0 = b0 * v.bs, e1 = std::min(v.n, b1 * v.bs);
      const float* am = v.am.f32 ? v.am.f32 + b0 : (v.am.fill(b0, b1, buf.data()), buf.data());
      K.nf4_dequant(v.data, e0, e1 - e0, am, b0, v.bs, v.lut, static_cast<char*>(out) + e0 * esize, t, stream);
    }
  });
}

// All block scales in fp32 (for the matmul, which reads each block many times).
static at::Tensor nf4_absmax_f32(const NF4View& v, const at::Tensor& absmax) {
  if (v.am.f32) return absmax;
  at::Tensor out = at::empty({v.nblocks}, absmax.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, v.nblocks, kMinWorkPerThread, [&](int64_t b0, int64_t b1) { v.am.fill(b0, b1, o + b0); });
  return out;
}

// --------------------------------------------------------------------------------------------
// NF4 quantize / dequantize
// --------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> nf4_quantize(const at::Tensor& w_, int64_t blocksize) {
  const char* op = "fastft::nf4_quantize";
  check_cpu(w_, op, "w");
  out_type(w_.scalar_type(), op);
  TORCH_CHECK(blocksize >= 2 && blocksize % 2 == 0 && blocksize <= 4096, op, ": blocksize must be even and in [2, 4096], got ", blocksize);
  const at::Tensor w = w_.contiguous();
  const int64_t n = w.numel(), nblocks = ceil_div(n, blocksize), nfull = n / blocksize;
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, w.options().dtype(at::kFloat));
  const std::vector<float> mids = midpoints(kNF4, 16);
  uint8_t* pk = packed.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  const KernelTable& K = kernels();
  const int64_t per = std::max<int64_t>(1, 16384 / blocksize);
  const bool f32 = w.scalar_type() == at::kFloat;
  at::parallel_for(0, ceil_div(nfull, per), grain_for(per * blocksize * 16), [&](int64_t c0, int64_t c1) {
    std::vector<float> buf(f32 ? 0 : per * blocksize);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b0 = c * per, b1 = std::min(nfull, b0 + per);
      const float* x;
      if (f32) {
        x = w.const_data_ptr<float>() + b0 * blocksize;
      } else {
        to_f32(w, b0 * blocksize, b1 * blocksize, buf.data());
        x = buf.data();
      }
      K.nf4_quant_blocks(x, b1 - b0, blocksize, mids.data(), pk + b0 * blocksize / 2, am + b0);
    }
  });
  if (const int64_t rem = n - nfull * blocksize) {
    // The short last block (same rule); an odd total pads the final low nibble with code 7 (0.0).
    std::vector<float> x(rem);
    std::vector<uint8_t> codes(rem + 1, 7);
    const std::vector<double> mids64(mids.begin(), mids.end());
    to_f32(w, nfull * blocksize, n, x.data());
    K.quant_codebook_block(x.data(), rem, mids64.data(), 15, codes.data(), am + nfull);
    for (int64_t j = 0; j < rem; j += 2) pk[(nfull * blocksize + j) / 2] = static_cast<uint8_t>((codes[j] << 4) | codes[j + 1]);
  }
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit(const at::Tensor& x_, const at::Tensor& code, int64_t blocksize) {
  const char* op = "fastft::quantize_blockwise_8bit";
  check_cpu(x_, op, "x");
  check_cpu(code, op, "code");
  TORCH_CHECK(x_.scalar_type() == at::kFloat, op, ": x must be fp32, got ", x_.scalar_type());
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.dim() == 1 && code.numel() >= 2 && code.numel() <= 256, op,
              ": code must be a 1-D fp32 codebook of 2..256 sorted values");
  TORCH_CHECK(blocksize >= 1, op, ": blocksize must be positive");
  const at::Tensor x = x_.contiguous(), c = code.contiguous();
  const float* cp = c.const_data_ptr<float>();
  // Midpoints in float64 are exact, so the code is the exactly nearest one (ties low), as
  // fastft's reference and bitsandbytes' CUDA kernel choose it.
  std::vector<double> mids(c.numel() - 1);
  for (int64_t i = 0; i + 1 < c.numel(); ++i) {
    TORCH_CHECK(cp[i] <= cp[i + 1], op, ": code must be sorted ascending");
    mids[i] = (static_cast<double>(cp[i]) + static_cast<double>(cp[i + 1])) / 2.0;
  }
  const int64_t n = x.numel(), nblocks = ceil_div(n, blocksize);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, x.options());
  const float* xp = x.const_data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  const KernelTable& K = kernels();
  at::parallel_for(0, nblocks, grain_for(blocksize * 8), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e0 = b * blocksize, len = std::min(n, e0 + blocksize) - e0;
      K.quant_codebook_block(xp + e0, len, mids.data(), static_cast<int64_t>(mids.size()), qp + e0, ap + b);
    }
  });
  return {q, absmax};
}

at::Tensor dequantize_blockwise_8bit(const at::Tensor& q_, const at::Tensor& absmax_, const at::Tensor& code_, int64_t blocksize,
                                     double offset) {
  const char* op = "fastft::dequantize_blockwise_8bit";
  for (auto* p : {&q_, &absmax_, &code_}) check_cpu(*p, op, "inputs");
  TORCH_CHECK(q_.scalar_type() == at::kByte, op, ": codes must be uint8");
  TORCH_CHECK(absmax_.scalar_type() == at::kFloat && code_.scalar_type() == at::kFloat && code_.numel() == 256, op,
              ": absmax must be fp32 and code 256 fp32 values");
  TORCH_CHECK(blocksize >= 1 && absmax_.numel() == ceil_div(q_.numel(), blocksize), op, ": absmax must hold one value per block");
  const at::Tensor q = q_.contiguous(), absmax = absmax_.contiguous(), code = code_.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  AbsmaxSource s;
  s.q8 = q.const_data_ptr<uint8_t>();
  s.nested = absmax.const_data_ptr<float>();
  s.ncode = code.const_data_ptr<float>();
  s.offset = static_cast<float>(offset);
  s.nbs = blocksize;
  float* o = out.data_ptr<float>();
  at::parallel_for(0, q.numel(), kMinWorkPerThread, [&](int64_t b0, int64_t b1) { s.fill(b0, b1, o + b0); });
  return out;
}

at::Tensor nf4_dequantize(const at::Tensor& data, const at::Tensor& absmax, const at::Tensor& quant_map,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_quant_map,
                          double offset, int64_t blocksize, int64_t nested_blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
  const char* op = "fastft::nf4_dequantize";
  const OutType t = out_type(dtype, op);
  const NF4View v = nf4_view(op, data, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, nested_blocksize,
                             numel_of(shape));
  at::Tensor out = empty_output(shape, data.options().dtype(dtype));
  nf4_dequant_all(v, out.data_ptr(), t, out.element_size());
  return out;
}

void nf4_dequantize_out(const at::Tensor& data, const at::Tensor& absmax, const at::Tensor& quant_map,
                        const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_quant_map,
                        double offset, int64_t blocksize, int64_t nested_blocksize, at::IntArrayRef shape, const at::Tensor& out) {
  const char* op = "fastft::nf4_dequantize_out";
  check_cpu(out, op, "out");
  const OutType t = out_type(out.scalar_type(), op);
  const NF4View v = nf4_view(op, data, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, nested_blocksize,
                             numel_of(shape));
  TORCH_CHECK(out.is_contiguous() && out.sizes() == shape, op, ": out must be contiguous with shape ", shape, ", got ", out.sizes(),
              out.is_contiguous() ? "" : " (non-contiguous)");
  nf4_dequant_all(v, out.data_ptr(), t, out.element_size());
}

// --------------------------------------------------------------------------------------------
// Int4 group-wise
// --------------------------------------------------------------------------------------------
struct Int4View {
  const uint8_t* data;
  const float* scales;
  const float* zeros;  // null: symmetric
  int64_t N, K, gs, G, row_bytes;
};

static Int4View int4_view(const char* op, const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                          int64_t group_size, int64_t N, int64_t K) {
  check_cpu(data, op, "data");
  check_cpu(scales, op, "scales");
  TORCH_CHECK(group_size >= 1 && K % group_size == 0, op, ": in_features (", K, ") must be a multiple of group_size (", group_size, ")");
  const int64_t G = K / group_size, rb = (K + 1) / 2;
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous() && data.numel() == N * rb, op,
              ": data must be contiguous uint8 (out_features, ceil(in_features / 2)) = (", N, ", ", rb, "), got ", data.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N * G, op,
              ": scales must be contiguous fp32 (", N, ", ", G, "), got ", scales.scalar_type(), " ", scales.sizes());
  const float* zp = nullptr;
  if (zeros.has_value()) {
    check_cpu(*zeros, op, "zeros");
    TORCH_CHECK(zeros->scalar_type() == at::kFloat && zeros->is_contiguous() && zeros->numel() == N * G, op,
                ": zeros must be contiguous fp32 (", N, ", ", G, ")");
    zp = zeros->const_data_ptr<float>();
  }
  return {data.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(), zp, N, K, group_size, G, rb};
}

// Int4 quantization, fastft's format (fastft/quant/int4.py), in fp32 with round-half-even:
// asymmetric: lo = min(min x, 0), hi = max(max x, 0), scale = (hi - lo) / 15, float zero point
//   zero = -lo / scale, q = clamp(round(x / scale + zero), 0, 15);
// symmetric: scale = max|x| / 7, q = clamp(round(x / scale), -8, 7) + 8.
// An all-zero group keeps scale 0 (and zero 0) and divides by 1. A group holding inf or NaN gets
// scale NaN (the caller turns that into an error). Odd in_features pad with the code of 0.0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> int4_quantize(const at::Tensor& w_, int64_t group_size, bool symmetric) {
  const char* op = "fastft::int4_quantize";
  check_cpu(w_, op, "w");
  out_type(w_.scalar_type(), op);
  TORCH_CHECK(w_.dim() == 2, op, ": w must be 2-D (out_features, in_features), got ", w_.sizes());
  const int64_t N = w_.size(0), K = w_.size(1);
  TORCH_CHECK(group_size >= 1 && K % group_size == 0, op, ": in_features (", K, ") must be a multiple of group_size (", group_size, ")");
  const at::Tensor w = w_.contiguous();
  const int64_t G = K / group_size, rb = (K + 1) / 2;
  at::Tensor data = at::empty({N, rb}, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty({N, G}, w.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({symmetric ? 0 : N, G}, w.options().dtype(at::kFloat));
  uint8_t* dp = data.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  float* zp = zeros.data_ptr<float>();
  const uint8_t pad = symmetric ? 8 : 0;
  at::parallel_for(0, N, grain_for(K * 16), [&](int64_t r0, int64_t r1) {
    std::vector<float> x(K);
    std::vector<uint8_t> codes(K + 1, pad);
    for (int64_t r = r0; r < r1; ++r) {
      to_f32(w, r * K, (r + 1) * K, x.data());
      for (int64_t g = 0; g < G; ++g) {
        const float* xg = x.data() + g * group_size;
        uint8_t* cg = codes.data() + g * group_size;
        bool bad = false;
        for (int64_t j = 0; j < group_size; ++j) bad |= !(std::fabs(xg[j]) <= 3.402823466e+38f);
        if (symmetric) {
          float am = 0.0f;
          for (int64_t j = 0; j < group_size; ++j) am = std::max(am, std::fabs(xg[j]));
          const float s = am / 7.0f;
          const float safe = s > 0.0f ? s : 1.0f;
          sp[r * G + g] = bad ? std::nanf("") : s;
          for (int64_t j = 0; j < group_size; ++j)
            cg[j] = static_cast<uint8_t>(std::min(std::max(std::nearbyint(xg[j] / safe), -8.0f), 7.0f) + 8.0f);
        } else {
          float lo = 0.0f, hi = 0.0f;
          for (int64_t j = 0; j < group_size; ++j) {
            lo = std::min(lo, xg[j]);
            hi = std::max(hi, xg[j]);
          }
          const float s = (hi - lo) / 15.0f;
          const bool pos = s > 0.0f;
          const float safe = pos ? s : 1.0f;
          const float z = pos ? -lo / safe : 0.0f;
          sp[r * G + g] = bad ? std::nanf("") : s;
          zp[r * G + g] = z;
          for (int64_t j = 0; j < group_size; ++j) {
            const float t = xg[j] / safe + z;  // two roundings, as torch's x / scale + zero
            cg[j] = static_cast<uint8_t>(std::min(std::max(std::nearbyint(t), 0.0f), 15.0f));
          }
        }
      }
      uint8_t* row = dp + r * rb;
      for (int64_t c = 0; c < rb; ++c) row[c] = static_cast<uint8_t>((codes[2 * c] << 4) | codes[2 * c + 1]);
    }
  });
  return {data, scales, zeros};
}

at::Tensor int4_dequantize(const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& zeros, int64_t group_size,
                           int64_t out_features, int64_t in_features, at::ScalarType dtype) {
  const char* op = "fastft::int4_dequantize";
  const OutType t = out_type(dtype, op);
  const Int4View v = int4_view(op, data, scales, zeros, group_size, out_features, in_features);
  at::Tensor out = empty_output({v.N, v.K}, data.options().dtype(dtype));
  char* o = static_cast<char*>(out.data_ptr());
  const int64_t es = out.element_size();
  const KernelTable& Kt = kernels();
  at::parallel_for(0, v.N, grain_for(v.K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      Kt.int4_dequant_row(v.data + r * v.row_bytes, 0, v.K, v.scales + r * v.G, v.zeros ? v.zeros + r * v.G : nullptr, v.gs,
                          o + r * v.K * es, t);
  });
  return out;
}

// --------------------------------------------------------------------------------------------
// Quant-matmul: y = x @ Wᵀ and dX = dY @ W with W dequantized tile by tile.
// `deq(row, k0, len, dst)` writes W[row, k0 : k0 + len) in the activation dtype to dst.
// --------------------------------------------------------------------------------------------
// Tile extent along a dimension of size `dim`: at most `max_extent` (the cache budget), a multiple
// of `align` when that is possible, and cut so that the tile count is a multiple of the thread
// count -- with 2 threads, 5 equal tiles leave one thread idle for a fifth of the time.
static int64_t tile_extent(int64_t dim, int64_t max_extent, int64_t align) {
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rounds = std::max<int64_t>(1, ceil_div(dim, nth * max_extent));
  int64_t t = ceil_div(dim, nth * rounds);
  if (t > align) t = ceil_div(t, align) * align;  // round up: never more tiles than nth * rounds
  return std::max<int64_t>(1, t);
}

template <class Deq>
static at::Tensor qmm_forward(const char* op, const at::Tensor& x_, const std::optional<at::Tensor>& bias, int64_t N, int64_t K,
                              const Deq& deq) {
  FASTFT_NO_AUTOCAST;
  check_cpu(x_, op, "x");
  out_type(x_.scalar_type(), op);
  TORCH_CHECK(x_.dim() >= 1 && x_.size(-1) == K, op, ": x must have in_features = ", K, " as its last dimension, got ", x_.sizes());
  if (bias.has_value()) {
    check_cpu(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == x_.scalar_type(), op,
                ": bias must be (out_features,) = (", N, ",) in x's dtype ", x_.scalar_type(), ", got ", bias->scalar_type(), " ",
                bias->sizes());
  }
  std::vector<int64_t> out_shape(x_.sizes().begin(), x_.sizes().end());
  out_shape.back() = N;
  const at::Tensor x = x_.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0), es = x.element_size();
  at::Tensor y = empty_output({M, N}, x.options());
  if (M == 0 || N == 0) return y.view(out_shape);
  if (K == 0) {
    if (bias.has_value()) return y.copy_(bias->expand({M, N})).view(out_shape);
    return y.zero_().view(out_shape);
  }
  if (g_strategy.load() == 1) {  // full scratch + one multi-threaded GEMM
    at::Tensor w = at::empty({N, K}, x.options());
    char* wp = static_cast<char*>(w.data_ptr());
    at::parallel_for(0, N, grain_for(K), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) deq(r, 0, K, wp + r * K * es);
    });
    if (bias.has_value()) at::addmm_out(y, *bias, x, w.t());
    else at::mm_out(y, x, w.t());
    return y.view(out_shape);
  }
  if (M <= g_fused_max_m.load()) {
    // Few rows of x (decoding, small batches): the GEMM is a handful of dot products per weight
    // element, so the BLAS call per tile would cost more than it saves. Dequantize each weight row
    // piece by piece into an L1 buffer (fp32) and take the dot products with all M rows of x at
    // once: W is read once, in 4-bit form, and never exists in full precision.
    const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
    const float* xp = xf.const_data_ptr<float>();
    at::Tensor yf = x.scalar_type() == at::kFloat ? y : at::empty({M, N}, x.options().dtype(at::kFloat));
    float* yp = yf.data_ptr<float>();
    const at::Tensor bf = bias.has_value() ? bias->to(at::kFloat) : at::Tensor();
    const float* bp = bias.has_value() ? bf.const_data_ptr<float>() : nullptr;
    const KernelTable& Kt = kernels();
    constexpr int64_t kChunk = 2048;  // 8 KiB of fp32 weights: stays in L1 next to the x pieces
    at::parallel_for(0, N, grain_for(K * (M + 4)), [&](int64_t r0, int64_t r1) {
      float wbuf[kChunk];
      std::vector<float> acc(M);
      for (int64_t r = r0; r < r1; ++r) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
          const int64_t len = std::min(kChunk, K - k0);
          deq.f32(r, k0, len, wbuf);
          Kt.dot_rows(wbuf, len, xp + k0, K, M, acc.data());
        }
        for (int64_t m = 0; m < M; ++m) yp[m * N + r] = bp ? acc[m] + bp[r] : acc[m];
      }
    });
    if (!yf.is_same(y)) y.copy_(yf);  // one rounding to x's dtype, as the BLAS output would be
    return y.view(out_shape);
  }
  // Row tiles of W: as many rows as fit the tile budget, but enough tiles to keep every thread busy.
  const int64_t nt = tile_extent(N, std::max<int64_t>(1, g_tile_elems.load() / K), 16);
  const int64_t ntiles = ceil_div(N, nt);
  at::parallel_for(0, ntiles, grain_for(nt * K * (M + 4)), [&](int64_t t0, int64_t t1) {
    at::Tensor buf = at::empty({nt, K}, x.options());
    char* bp = static_cast<char*>(buf.data_ptr());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * nt, nr = std::min(N, n0 + nt) - n0;
      for (int64_t r = 0; r < nr; ++r) deq(n0 + r, 0, K, bp + r * K * es);
      const at::Tensor wt = buf.narrow(0, 0, nr).t();
      // The bias goes into the GEMM (beta = 1), one rounding as in F.linear.
      y.narrow(1, n0, nr).copy_(bias.has_value() ? at::addmm(bias->narrow(0, n0, nr), x, wt) : at::mm(x, wt));
    }
  });
  return y.view(out_shape);
}

template <class Deq>
static at::Tensor qmm_grad_x(const char* op, const at::Tensor& g_, int64_t N, int64_t K, int64_t align, const Deq& deq) {
  FASTFT_NO_AUTOCAST;
  check_cpu(g_, op, "grad");
  out_type(g_.scalar_type(), op);
  TORCH_CHECK(g_.dim() >= 1 && g_.size(-1) == N, op, ": grad must have out_features = ", N, " as its last dimension, got ", g_.sizes());
  std::vector<int64_t> out_shape(g_.sizes().begin(), g_.sizes().end());
  out_shape.back() = K;
  const at::Tensor g = g_.reshape({-1, N}).contiguous();
  const int64_t M = g.size(0), es = g.element_size();
  at::Tensor dx = empty_output({M, K}, g.options());
  if (M == 0 || K == 0) return dx.view(out_shape);
  if (N == 0) return dx.zero_().view(out_shape);
  if (g_strategy.load() == 1) {
    at::Tensor w = at::empty({N, K}, g.options());
    char* wp = static_cast<char*>(w.data_ptr());
    at::parallel_for(0, N, grain_for(K), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) deq(r, 0, K, wp + r * K * es);
    });
    at::mm_out(dx, g, w);
    return dx.view(out_shape);
  }
  // Column tiles of W (all N rows, kt columns), kt a multiple of `align` = 32 where possible: with
  // blocks / groups of a multiple of 32 elements, 32-aligned tile edges keep every 32-element SIMD
  // run inside one block, while still letting the tiles split evenly over the threads.
  const int64_t kt = tile_extent(K, std::max<int64_t>(1, g_tile_elems.load() / N), align);
  const int64_t ntiles = ceil_div(K, kt);
  at::parallel_for(0, ntiles, grain_for(kt * N * (M + 4)), [&](int64_t t0, int64_t t1) {
    at::Tensor buf = at::empty({N * kt}, g.options());
    char* bp = static_cast<char*>(buf.data_ptr());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = t * kt, kr = std::min(K, k0 + kt) - k0;
      for (int64_t r = 0; r < N; ++r) deq(r, k0, kr, bp + r * kr * es);
      dx.narrow(1, k0, kr).copy_(at::mm(g, buf.narrow(0, 0, N * kr).view({N, kr})));
    }
  });
  return dx.view(out_shape);
}

struct NF4Deq {
  NF4View v;
  const float* am;  // all block scales, fp32
  int64_t K;
  OutType t;
  const KernelTable* k;
  void operator()(int64_t row, int64_t k0, int64_t len, void* dst) const {
    k->nf4_dequant(v.data, row * K + k0, len, am, 0, v.bs, v.lut, dst, t, /*stream=*/false);  // tile stays in cache
  }
  void f32(int64_t row, int64_t k0, int64_t len, float* dst) const {
    k->nf4_dequant(v.data, row * K + k0, len, am, 0, v.bs, v.lut, dst, OutType::F32, false);
  }
};

struct Int4Deq {
  Int4View v;
  OutType t;
  const KernelTable* k;
  void operator()(int64_t row, int64_t k0, int64_t len, void* dst) const {
    k->int4_dequant_row(v.data + row * v.row_bytes, k0, len, v.scales + row * v.G, v.zeros ? v.zeros + row * v.G : nullptr, v.gs, dst, t);
  }
  void f32(int64_t row, int64_t k0, int64_t len, float* dst) const {
    k->int4_dequant_row(v.data + row * v.row_bytes, k0, len, v.scales + row * v.G, v.zeros ? v.zeros + row * v.G : nullptr, v.gs, dst,
                        OutType::F32);
  }
};

#define NF4_ARGS                                                                                                            \
  const at::Tensor &data, const at::Tensor &absmax, const at::Tensor &quant_map, const std::optional<at::Tensor>&nested_absmax, \
      const std::optional<at::Tensor>&nested_quant_map, double offset, int64_t blocksize, int64_t nested_blocksize,           \
      int64_t out_features, int64_t in_features

at::Tensor nf4_matmul(const at::Tensor& x, const std::optional<at::Tensor>& bias, NF4_ARGS) {
  const char* op = "fastft::nf4_matmul";
  const NF4View v = nf4_view(op, data, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, nested_blocksize,
                             out_features * in_features);
  const at::Tensor am = nf4_absmax_f32(v, absmax);
  const NF4Deq deq{v, am.const_data_ptr<float>(), in_features, out_type(x.scalar_type(), op), &kernels()};
  return qmm_forward(op, x, bias, out_features, in_features, deq);
}

at::Tensor nf4_matmul_grad_x(const at::Tensor& grad, NF4_ARGS) {
  const char* op = "fastft::nf4_matmul_grad_x";
  const NF4View v = nf4_view(op, data, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, nested_blocksize,
                             out_features * in_features);
  const at::Tensor am = nf4_absmax_f32(v, absmax);
  const NF4Deq deq{v, am.const_data_ptr<float>(), in_features, out_type(grad.scalar_type(), op), &kernels()};
  return qmm_grad_x(op, grad, out_features, in_features, 32, deq);
}

at::Tensor int4_matmul(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                       int64_t group_size, int64_t out_features, int64_t in_features) {
  const char* op = "fastft::int4_matmul";
  const Int4View v = int4_view(op, data, scales, zeros, group_size, out_features, in_features);
  return qmm_forward(op, x, bias, out_features, in_features, Int4Deq{v, out_type(x.scalar_type(), op), &kernels()});
}

at::Tensor int4_matmul_grad_x(const at::Tensor& grad, const at::Tensor& data, const at::Tensor& scales,
                              const std::optional<at::Tensor>& zeros, int64_t group_size, int64_t out_features, int64_t in_features) {
  const char* op = "fastft::int4_matmul_grad_x";
  const Int4View v = int4_view(op, data, scales, zeros, group_size, out_features, in_features);
  return qmm_grad_x(op, grad, out_features, in_features, 32,
                    Int4Deq{v, out_type(grad.scalar_type(), op), &kernels()});
}

// Cross-entropy loss and logits gradient in place, one row per task: logits (n, V) fp32 / bf16
// contiguous, targets (n,) int64 (ignore_index: no loss, zero gradient). Returns the (n,) fp32
// per-row losses lse - z[target]; logits become softmax - onehot (see KernelTable::ce_row).
at::Tensor ce_loss_grad_(at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  const char* op = "fastft::ce_loss_grad_";
  check_cpu(logits, op, "logits");
  check_cpu(targets, op, "targets");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), op, ": logits must be a contiguous (rows, classes) matrix, got ",
              logits.sizes(), logits.is_contiguous() ? "" : " (not contiguous)");
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16, op, ": logits must be float32 or bfloat16, got ", st);
  const int64_t n = logits.size(0), V = logits.size(1);
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n && targets.scalar_type() == at::kLong, op,
              ": targets must be (", n, ",) int64, got ", targets.scalar_type(), " ", targets.sizes());
  const at::Tensor tg = targets.contiguous();
  const int64_t* tp = tg.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(tp[i] == ignore_index || (tp[i] >= 0 && tp[i] < V), op, ": target ", tp[i], " at row ", i,
                " is outside [0, ", V, ") and is not ignore_index ", ignore_index);
  at::Tensor loss = at::empty({n}, logits.options().dtype(at::kFloat));
  if (n == 0) return loss;
  TORCH_CHECK(V > 0, op, ": logits have no classes");
  float* lp = loss.data_ptr<float>();
  char* zp = static_cast<char*>(logits.data_ptr());
  const int64_t es = logits.element_size();
  const OutType t = st == at::kFloat ? OutType::F32 : OutType::BF16;
  const KernelTable& Kt = kernels();
  at::parallel_for(0, n, grain_for(V * 8), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) lp[r] = Kt.ce_row(zp + r * V * es, V, tp[r] == ignore_index ? -1 : tp[r], t);
  });
  return loss;
}

// --------------------------------------------------------------------------------------------
// Attention on CPU: q (B, Hq, T, D), k / v (B, Hkv, S, D), Hq % Hkv == 0, fp32 or bf16; causal
// masks aligned bottom-right (row i sees keys j <= i + S - T). Every product is an fp32 GEMM (the
// BLAS, single-threaded inside our parallel region) on blocks of 64 query rows against only the
// keys the block can see, with the softmax between them done in L2-resident fp32 rows; K/V are
// indexed per query head (GQA without copies). The backward recomputes P from the saved
// log-sum-exp and runs one task per (batch, kv head), so dK / dV accumulate without atomics and the
// result is deterministic.
// --------------------------------------------------------------------------------------------
static constexpr int64_t kAttnBlockQ = 64;

static inline int64_t visible_keys(int64_t i, int64_t T, int64_t S, bool causal) {
  return causal ? std::min<int64_t>(S, std::max<int64_t>(0, i + S - T + 1)) : S;
}
// Key padding: per batch row the sorted indices of masked keys. `visible` hides them in one row of
// scores (-inf, so they get probability 0) and returns how many leading keys the row keeps: 0
// when every key it could see is masked (the row then outputs 0, as the reference does).
struct KeyMask {
  std::vector<std::vector<int64_t>> masked;  // empty: no mask
  explicit KeyMask(const std::optional<at::Tensor>& m, int64_t B, int64_t S, const char* op) {
    if (!m.has_value()) return;
    TORCH_CHECK(m->scalar_type() == at::kBool && m->dim() == 2 && m->size(0) == B && m->size(1) == S, op,
                ": key_padding_mask must be bool (B, S) = (", B, ", ", S, "), got ", m->scalar_type(), " ", m->sizes());
    const at::Tensor mc = m->detach().contiguous();
    const bool* mp = mc.const_data_ptr<bool>();
    masked.resize(B);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < S; ++j)
        if (!mp[b * S + j]) masked[b].push_back(j);
  }
  int64_t visible(float* row, int64_t b, int64_t len) const {
    if (masked.empty()) return len;
    int64_t n = 0;
    for (int64_t j : masked[b]) {
      if (j >= len) break;
      row[j] = -INFINITY;
      ++n;
    }
    return n == len ? 0 : len;
  }
};

static std::atomic<int> g_attn_bf16{1};  // use the AVX512-BF16 GEMMs for bf16 inputs when the CPU has them

static const AttnBf16Kernels* bf16_attn_kernels() {
  static const bool cpu_ok = [] {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    return false;
#endif
  }();
  return cpu_ok && g_attn_bf16.load() ? attn_bf16_kernels_compiled() : nullptr;
}

static inline const uint16_t* u16(const at::Tensor& t) { return static_cast<const uint16_t*>(t.const_data_ptr()); }

// Causal blocks skip the hidden triangle at 16-row granularity: `each_sub(n, i0, ...)` calls
// f(r0, rows, cols) for 16-row pieces of a query block, cols = the keys the piece's last row sees.
static constexpr int64_t kAttnSub = 16;
template <class F>
static inline void each_sub(int64_t n, int64_t i0, int64_t T, int64_t S, bool causal, int64_t kend, const F& f) {
  for (int64_t r0 = 0; r0 < n; r0 += kAttnSub) {
    const int64_t rows = std::min(kAttnSub, n - r0);
    f(r0, rows, std::min(kend, visible_keys(i0 + r0 + rows - 1, T, S, causal)));
  }
}
static inline int64_t even_up(int64_t v) { return v + (v & 1); }
static inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// bf16 forward on the pair-packed GEMMs: per (batch, kv head) K is packed as Kᵀ (for S = Q Kᵀ) and
// V as is (for O = P V); per 64-row query block S (fp32) -> softmax rows -> P rounded to bf16 ->
// O (fp32) -> one rounding to bf16.
static void attn_fwd_bf16(const AttnBf16Kernels& K2, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, float scale,
                          bool causal, const KeyMask& km, at::Tensor& out, float* lp) {
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  const int64_t G = Hq / Hkv, Sh = (S + 1) / 2;
  const KernelTable& Kt = kernels();
  at::Tensor kpt = at::empty({B * Hkv, D / 2 * S}, q.options().dtype(at::kInt));
  at::Tensor vp = at::empty({B * Hkv, Sh * D}, q.options().dtype(at::kInt));
  uint32_t* kptp = reinterpret_cast<uint32_t*>(kpt.data_ptr());
  uint32_t* vpp = reinterpret_cast<uint32_t*>(vp.data_ptr());
  uint16_t* outp = static_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      K2.pack_cols(u16(k) + t * S * D, D, S, D, kptp + t * (D / 2) * S);
      K2.pack_rows(u16(v) + t * S * D, D, S, D, vpp + t * Sh * D);
    }
  });
  const int64_t nqb = ceil_div(T, kAttnBlockQ);
  at::parallel_for(0, B * Hq * nqb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sbuf(kAttnBlockQ * S), obuf(kAttnBlockQ * D);
    std::vector<uint16_t> pb(kAttnBlockQ * (S + 1));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (Hq * nqb), h = (t / nqb) % Hq, i0 = (t % nqb) * kAttnBlockQ, hk = h / G, bk = b * Hkv + hk;
      const int64_t n = std::min(kAttnBlockQ, T - i0);
      const int64_t kend = visible_keys(i0 + n - 1, T, S, causal);
      uint16_t* ob = outp + ((b * Hq + h) * T + i0) * D;
      float* lrow = lp + (b * Hq + h) * T + i0;
      if (kend == 0) {
        std::fill(ob, ob + n * D, static_cast<uint16_t>(0));
        std::fill(lrow, lrow + n, -INFINITY);
        continue;
      }
      const int64_t ke = kend + (kend & 1);
      const uint16_t* qrows = u16(q) + ((b * Hq + h) * T + i0) * D;
      each_sub(n, i0, T, S, causal, kend, [&](int64_t r0, int64_t rows, int64_t cols) {
        if (cols > 0) K2.gemm(qrows + r0 * D, D, kptp + bk * (D / 2) * S, S, sbuf.data() + r0 * kend, kend, rows, cols, D, false);
      });
      for (int64_t r = 0; r < n; ++r)
        lrow[r] = Kt.attn_softmax_row(sbuf.data() + r * kend, km.visible(sbuf.data() + r * kend, b, visible_keys(i0 + r, T, S, causal)),
                                      kend, scale);
      K2.to_bf16(sbuf.data(), kend, n, kend, pb.data(), ke, ke);
      each_sub(n, i0, T, S, causal, kend, [&](int64_t r0, int64_t rows, int64_t cols) {
        if (cols > 0) K2.gemm(pb.data() + r0 * ke, ke, vpp + bk * Sh * D, D, obuf.data() + r0 * D, D, rows, D, even_up(cols), false);
        else std::fill(obuf.data() + r0 * D, obuf.data() + (r0 + rows) * D, 0.0f);
      });
      K2.store_rows(obuf.data(), D, n, D, 1.0f, ob, D);
    }
  });
}

// bf16 backward: one task per (batch, kv head). dVᵀ += dOᵀ P and dKᵀ += Qᵀ dS accumulate in fp32
// (D x S) over the group's heads and query blocks (A = the transposed dO / Q block, B = the
// pair-packed bf16 P / dS rows); dQ = scale · dS K per block. P and dS are rounded to bf16 before
// their GEMMs, as FlashAttention-2 does on tensor cores; S, dP and every accumulation are fp32.
static void attn_bwd_bf16(const AttnBf16Kernels& K2, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& out, const float* lp, float scale, bool causal,
                          const KeyMask& km, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  const int64_t G = Hq / Hkv, Sh = (S + 1) / 2, Tp = T + (T & 1);
  const KernelTable& Kt = kernels();
  const int64_t nqb = ceil_div(T, kAttnBlockQ);
  uint16_t* dqp = static_cast<uint16_t*>(dq.data_ptr());
  uint16_t* dkp = static_cast<uint16_t*>(dk.data_ptr());
  uint16_t* dvp = static_cast<uint16_t*>(dv.data_ptr());
  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint32_t> kpt(D / 2 * S), kp(Sh * D), vpt(D / 2 * S);
    std::vector<float> dkT(D * S), dvT(D * S), sbuf(kAttnBlockQ * S), dpbuf(kAttnBlockQ * S), dqbuf(kAttnBlockQ * D);
    std::vector<uint16_t> qT(D * Tp), doT(D * Tp), pb(kAttnBlockQ * (S + 1)), dsb(kAttnBlockQ * (S + 1));
    std::vector<uint32_t> pP((kAttnBlockQ / 2) * (S + 1)), pdS((kAttnBlockQ / 2) * (S + 1));
    std::vector<float> di(T);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, hk = t % Hkv;
      const uint16_t* kb = u16(k) + t * S * D;
      const uint16_t* vb = u16(v) + t * S * D;
      K2.pack_cols(kb, D, S, D, kpt.data());
      K2.pack_rows(kb, D, S, D, kp.data());
      K2.pack_cols(vb, D, S, D, vpt.data());
      std::fill(dkT.begin(), dkT.end(), 0.0f);
      std::fill(dvT.begin(), dvT.end(), 0.0f);
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        const int64_t bh = b * Hq + h;
        const uint16_t* qh = u16(q) + bh * T * D;
        const uint16_t* doh = u16(dout) + bh * T * D;
        const uint16_t* oh = u16(out) + bh * T * D;
        for (int64_t i = 0; i < T; ++i) {  // di = Σ_d dO·O per row, in fp32 from the bf16 values
          float acc = 0.0f;
          for (int64_t d = 0; d < D; ++d) acc += bf16_to_f32(doh[i * D + d]) * bf16_to_f32(oh[i * D + d]);
          di[i] = acc;
        }
        K2.transpose16(qh, D, T, D, qT.data(), Tp, Tp);
        K2.transpose16(doh, D, T, D, doT.data(), Tp, Tp);
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t i0 = qb * kAttnBlockQ, n = std::min(kAttnBlockQ, T - i0);
          const int64_t kend = visible_keys(i0 + n - 1, T, S, causal);
          uint16_t* dqb = dqp + (bh * T + i0) * D;
          if (kend == 0) {
            std::fill(dqb, dqb + n * D, static_cast<uint16_t>(0));
            continue;
          }
          const int64_t ke = kend + (kend & 1), ne = n + (n & 1);
          each_sub(n, i0, T, S, causal, kend, [&](int64_t r0, int64_t rows, int64_t cols) {
            if (cols == 0) return;
            K2.gemm(qh + (i0 + r0) * D, D, kpt.data(), S, sbuf.data() + r0 * kend, kend, rows, cols, D, false);
            K2.gemm(doh + (i0 + r0) * D, D, vpt.data(), S, dpbuf.data() + r0 * kend, kend, rows, cols, D, false);
          });
          for (int64_t r = 0; r < n; ++r) {
            const float l = lp[bh * T + i0 + r];
            const int64_t len = km.visible(sbuf.data() + r * kend, b, visible_keys(i0 + r, T, S, causal));
            Kt.attn_grad_row(sbuf.data() + r * kend, dpbuf.data() + r * kend, l == -INFINITY ? 0 : len, kend, scale, l, di[i0 + r]);
          }
          K2.to_bf16(sbuf.data(), kend, n, kend, pb.data(), ke, ke);
          K2.to_bf16(dpbuf.data(), kend, n, kend, dsb.data(), ke, ke);
          K2.pack_rows(pb.data(), ke, n, ke, pP.data());
          K2.pack_rows(dsb.data(), ke, n, ke, pdS.data());
          // dVᵀ / dKᵀ by 64-key column tiles: query rows below the first that sees the tile add 0.
          for (int64_t c0 = 0; c0 < kend; c0 += 64) {
            const int64_t w = std::min<int64_t>(64, kend - c0);
            int64_t r0 = causal ? std::max<int64_t>(0, c0 - (S - T) - i0) : 0;
            r0 -= r0 & 1;  // pairs of query rows stay aligned with the packing
            if (r0 >= n) continue;
            K2.gemm(doT.data() + i0 + r0, Tp, pP.data() + (r0 / 2) * ke + c0, ke, dvT.data() + c0, S, D, w, ne - r0, true);
            K2.gemm(qT.data() + i0 + r0, Tp, pdS.data() + (r0 / 2) * ke + c0, ke, dkT.data() + c0, S, D, w, ne - r0, true);
          }
          each_sub(n, i0, T, S, causal, kend, [&](int64_t r0, int64_t rows, int64_t cols) {
            if (cols > 0) K2.gemm(dsb.data() + r0 * ke, ke, kp.data(), D, dqbuf.data() + r0 * D, D, rows, D, even_up(cols), false);
            else std::fill(dqbuf.data() + r0 * D, dqbuf.data() + (r0 + rows) * D, 0.0f);
          });
          K2.store_rows(dqbuf.data(), D, n, D, scale, dqb, D);
        }
      }
      K2.store_t(dkT.data(), S, S, D, scale, dkp + t * S * D, D);
      K2.store_t(dvT.data(), S, S, D, 1.0f, dvp + t * S * D, D);
    }
  });
}


static void check_attn(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cpu(q, op, "q");
  check_cpu(k, op, "k");
  check_cpu(v, op, "v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D (B, H, T, D), got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16, op, ": q must be float32 or bfloat16, got ", st);
  TORCH_CHECK(k.scalar_type() == st && v.scalar_type() == st, op, ": q, k, v must share one dtype, got ", st, ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, ": k/v batch and head dim must match q's, got q ",
              q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": the query heads (", q.size(1),
              ") must be a multiple of the key/value heads (", k.size(1), ")");
}

std::tuple<at::Tensor, at::Tensor> attn_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, double scale_,
                                            bool causal, const std::optional<at::Tensor>& key_padding_mask) {
  FASTFT_NO_AUTOCAST;
  const char* op = "fastft::attn_fwd";
  check_attn(op, q_, k_, v_);
  at::NoGradGuard no_grad;  // the ATen calls below are the kernel's insides, not graph nodes
  const int64_t B = q_.size(0), Hq = q_.size(1), T = q_.size(2), D = q_.size(3), Hkv = k_.size(1), S = k_.size(2);
  const int64_t G = Hq / Hkv;
  const float scale = static_cast<float>(scale_);
  at::Tensor out = at::empty({B, Hq, T, D}, q_.options());
  at::Tensor lse = at::empty({B, Hq, T}, q_.options().dtype(at::kFloat));
  const KeyMask km(key_padding_mask, B, S, op);
  if (out.numel() == 0) return {out, lse.fill_(-INFINITY)};
  const AttnBf16Kernels* K2 = bf16_attn_kernels();
  if (K2 && q_.scalar_type() == at::kBFloat16 && D % 2 == 0) {
    attn_fwd_bf16(*K2, q_.detach().contiguous(), k_.detach().contiguous(), v_.detach().contiguous(), scale, causal, km, out,
                  lse.data_ptr<float>());
    return {out, lse};
  }
  // Detached: the OpenMP workers below do not inherit this thread's no-grad mode.
  const at::Tensor qf = q_.detach().to(at::kFloat).contiguous(), kf = k_.detach().to(at::kFloat).contiguous(),
                   vf = v_.detach().to(at::kFloat).contiguous();
  const bool f32 = q_.scalar_type() == at::kFloat;
  float* lp = lse.data_ptr<float>();
  const KernelTable& Kt = kernels();
  const int64_t nqb = ceil_div(T, kAttnBlockQ);
  at::parallel_for(0, B * Hq * nqb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (Hq * nqb), h = (t / nqb) % Hq, i0 = (t % nqb) * kAttnBlockQ, hk = h / G;
      const int64_t n = std::min(kAttnBlockQ, T - i0);
      const int64_t kend = visible_keys(i0 + n - 1, T, S, causal);  // the block's last row sees the most
      at::Tensor ob = out.select(0, b).select(0, h).narrow(0, i0, n);
      float* lrow = lp + (b * Hq + h) * T + i0;
      if (kend == 0 || D == 0) {
        ob.zero_();
        for (int64_t r = 0; r < n; ++r) lrow[r] = kend == 0 ? -INFINITY : std::log(static_cast<float>(kend));
        continue;
      }
      at::Tensor s = at::mm(qf.select(0, b).select(0, h).narrow(0, i0, n), kf.select(0, b).select(0, hk).narrow(0, 0, kend).t());
      float* sp = s.data_ptr<float>();
      for (int64_t r = 0; r < n; ++r)
        lrow[r] = Kt.attn_softmax_row(sp + r * kend, km.visible(sp + r * kend, b, visible_keys(i0 + r, T, S, causal)), kend, scale);
      const at::Tensor vb = vf.select(0, b).select(0, hk).narrow(0, 0, kend);
      if (f32) at::mm_out(ob, s, vb);
      else ob.copy_(at::mm(s, vb));  // one rounding of the fp32 result to bf16
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(const at::Tensor& dout, const at::Tensor& q_, const at::Tensor& k_,
                                                        const at::Tensor& v_, const at::Tensor& out, const at::Tensor& lse,
                                                        double scale_, bool causal,
                                                        const std::optional<at::Tensor>& key_padding_mask) {
  FASTFT_NO_AUTOCAST;
  const char* op = "fastft::attn_bwd";
  check_attn(op, q_, k_, v_);
  at::NoGradGuard no_grad;
  TORCH_CHECK(dout.sizes() == q_.sizes() && out.sizes() == q_.sizes(), op, ": grad and out must have q's shape ", q_.sizes(),
              ", got ", dout.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == q_.size(0) && lse.size(1) == q_.size(1) &&
                  lse.size(2) == q_.size(2),
              op, ": lse must be float32 (B, Hq, T), got ", lse.scalar_type(), " ", lse.sizes());
  const int64_t B = q_.size(0), Hq = q_.size(1), T = q_.size(2), D = q_.size(3), Hkv = k_.size(1), S = k_.size(2);
  const int64_t G = Hq / Hkv;
  const float scale = static_cast<float>(scale_);
  at::Tensor dq = at::empty({B, Hq, T, D}, q_.options()), dk = at::empty({B, Hkv, S, D}, k_.options()),
             dv = at::empty({B, Hkv, S, D}, v_.options());
  if (dq.numel() == 0 && dk.numel() == 0) return {dq, dk, dv};
  const at::Tensor ls = lse.contiguous();
  const float* lp = ls.const_data_ptr<float>();
  const KeyMask km(key_padding_mask, B, S, op);
  const AttnBf16Kernels* K2 = bf16_attn_kernels();
  if (K2 && q_.scalar_type() == at::kBFloat16 && D % 2 == 0) {
    attn_bwd_bf16(*K2, dout.detach().to(at::kBFloat16).contiguous(), q_.detach().contiguous(), k_.detach().contiguous(),
                  v_.detach().contiguous(), out.detach().to(at::kBFloat16).contiguous(), lp, scale, causal, km, dq, dk, dv);
    return {dq, dk, dv};
  }
  const at::Tensor qf = q_.detach().to(at::kFloat).contiguous(), kf = k_.detach().to(at::kFloat).contiguous(),
                   vf = v_.detach().to(at::kFloat).contiguous(), dof = dout.detach().to(at::kFloat).contiguous();
  const at::Tensor di = (dof * out.detach().to(at::kFloat)).sum(-1).contiguous();  // (B, Hq, T): Σ_d dO·O
  const float* dip = di.const_data_ptr<float>();
  const KernelTable& Kt = kernels();
  const int64_t nqb = ceil_div(T, kAttnBlockQ);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, hk = t % Hkv;
      at::Tensor dkacc = at::zeros({S, D}, qf.options()), dvacc = at::zeros({S, D}, qf.options());
      const at::Tensor kb_all = kf.select(0, b).select(0, hk), vb_all = vf.select(0, b).select(0, hk);
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t i0 = qb * kAttnBlockQ, n = std::min(kAttnBlockQ, T - i0);
          const int64_t kend = visible_keys(i0 + n - 1, T, S, causal);
          at::Tensor dqb = dq.select(0, b).select(0, h).narrow(0, i0, n);
          if (kend == 0 || D == 0) {
            dqb.zero_();
            continue;
          }
          const at::Tensor kb = kb_all.narrow(0, 0, kend), vb = vb_all.narrow(0, 0, kend);
          const at::Tensor qblk = qf.select(0, b).select(0, h).narrow(0, i0, n);
          const at::Tensor doblk = dof.select(0, b).select(0, h).narrow(0, i0, n);
          at::Tensor s = at::mm(qblk, kb.t());
          at::Tensor dp = at::mm(doblk, vb.t());
          float* sp = s.data_ptr<float>();
          float* dpp = dp.data_ptr<float>();
          const int64_t row0 = (b * Hq + h) * T + i0;
          for (int64_t r = 0; r < n; ++r)
            Kt.attn_grad_row(sp + r * kend, dpp + r * kend,
                             lp[row0 + r] == -INFINITY ? 0 : km.visible(sp + r * kend, b, visible_keys(i0 + r, T, S, causal)), kend,
                             scale, lp[row0 + r],
                             dip[row0 + r]);
          dvacc.narrow(0, 0, kend).addmm_(s.t(), doblk);
          dkacc.narrow(0, 0, kend).addmm_(dp.t(), qblk, 1.0, scale);
          dqb.copy_(at::mm(dp, kb).mul_(scale));
        }
      }
      dk.select(0, b).select(0, hk).copy_(dkacc);
      dv.select(0, b).select(0, hk).copy_(dvacc);
    }
  });
  return {dq, dk, dv};
}

// --------------------------------------------------------------------------------------------
// Fused rows of the transformer block: RMSNorm (forward, input gradient) and SwiGLU's silu(g)·u.
// fp32 or bf16 tensors, all of one dtype; one pass per row (two for the norm's reductions).
// --------------------------------------------------------------------------------------------
static OutType row_type(const at::Tensor& t, const char* op, const char* name) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  return t.scalar_type() == at::kFloat ? OutType::F32 : OutType::BF16;
}

static void same_type(const char* op, const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", an, " and ", bn, " must share one dtype, got ", a.scalar_type(), " and ",
              b.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> rmsnorm_fwd(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  const char* op = "fastft::rmsnorm_fwd";
  const OutType t = row_type(x_, op, "x");
  row_type(w_, op, "weight");
  same_type(op, x_, w_, "x", "weight");
  TORCH_CHECK(x_.dim() >= 1 && w_.dim() == 1 && w_.size(0) == x_.size(-1), op, ": weight must be (", x_.size(-1),
              ",) for x of shape ", x_.sizes(), ", got ", w_.sizes());
  const at::Tensor x = x_.detach().contiguous(), w = w_.detach().contiguous();
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0, es = x.element_size();
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  const void* wp = w.const_data_ptr();
  char* yp = static_cast<char*>(y.data_ptr());
  float* rp = rstd.data_ptr<float>();
  const KernelTable& Kt = kernels();
  if (H == 0) return {y, rstd.fill_(1.0f / std::sqrt(static_cast<float>(eps)))};
  at::parallel_for(0, rows, grain_for(H * 4), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rp[r] = Kt.rmsnorm_row(xp + r * H * es, wp, yp + r * H * es, H, static_cast<float>(eps), t);
  });
  return {y, rstd};
}

at::Tensor rmsnorm_bwd(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& rstd_) {
  const char* op = "fastft::rmsnorm_bwd";
  const OutType t = row_type(x_, op, "x");
  same_type(op, x_, w_, "x", "weight");
  same_type(op, x_, dy_, "x", "grad");
  TORCH_CHECK(dy_.sizes() == x_.sizes() && w_.dim() == 1 && w_.size(0) == x_.size(-1) && rstd_.scalar_type() == at::kFloat &&
                  rstd_.numel() * std::max<int64_t>(1, x_.size(-1)) == std::max<int64_t>(x_.numel(), rstd_.numel()),
              op, ": shapes do not match x ", x_.sizes(), " (grad ", dy_.sizes(), ", weight ", w_.sizes(), ", rstd ", rstd_.sizes(), ")");
  const at::Tensor dy = dy_.detach().contiguous(), x = x_.detach().contiguous(), w = w_.detach().contiguous(),
                   rstd = rstd_.detach().contiguous();
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0, es = x.element_size();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const char* dyp = static_cast<const char*>(dy.const_data_ptr());
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  const void* wp = w.const_data_ptr();
  char* dxp = static_cast<char*>(dx.data_ptr());
  const float* rp = rstd.const_data_ptr<float>();
  const KernelTable& Kt = kernels();
  at::parallel_for(0, rows, grain_for(H * 6), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) Kt.rmsnorm_bwd_row(dyp + r * H * es, xp + r * H * es, wp, rp[r], dxp + r * H * es, H, t);
  });
  return dx;
}

static constexpr int64_t kEltChunk = 4096;

at::Tensor silu_mul(const at::Tensor& g_, const at::Tensor& u_) {
  const char* op = "fastft::silu_mul";
  const OutType t = row_type(g_, op, "g");
  same_type(op, g_, u_, "g", "u");
  TORCH_CHECK(g_.sizes() == u_.sizes(), op, ": g and u must have the same shape, got ", g_.sizes(), " and ", u_.sizes());
  const at::Tensor g = g_.detach().contiguous(), u = u_.detach().contiguous();
  at::Tensor y = at::empty(g.sizes(), g.options());
  const int64_t n = g.numel(), es = g.element_size();
  const char* gp = static_cast<const char*>(g.const_data_ptr());
  const char* up = static_cast<const char*>(u.const_data_ptr());
  char* yp = static_cast<char*>(y.data_ptr());
  const KernelTable& Kt = kernels();
  at::parallel_for(0, ceil_div(n, kEltChunk), grain_for(kEltChunk * 8), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t a = c * kEltChunk, len = std::min(kEltChunk, n - a);
      Kt.silu_mul_row(gp + a * es, up + a * es, yp + a * es, len, t);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> silu_mul_bwd(const at::Tensor& dy_, const at::Tensor& g_, const at::Tensor& u_) {
  const char* op = "fastft::silu_mul_bwd";
  const OutType t = row_type(g_, op, "g");
  same_type(op, g_, u_, "g", "u");
  same_type(op, g_, dy_, "g", "grad");
  TORCH_CHECK(g_.sizes() == u_.sizes() && dy_.sizes() == g_.sizes(), op, ": grad, g and u must have one shape, got ", dy_.sizes(),
              ", ", g_.sizes(), ", ", u_.sizes());
  const at::Tensor dy = dy_.detach().contiguous(), g = g_.detach().contiguous(), u = u_.detach().contiguous();
  at::Tensor dg = at::empty(g.sizes(), g.options()), du = at::empty(g.sizes(), g.options());
  const int64_t n = g.numel(), es = g.element_size();
  const char* dyp = static_cast<const char*>(dy.const_data_ptr());
  const char* gp = static_cast<const char*>(g.const_data_ptr());
  const char* up = static_cast<const char*>(u.const_data_ptr());
  char* dgp = static_cast<char*>(dg.data_ptr());
  char* dup = static_cast<char*>(du.data_ptr());
  const KernelTable& Kt = kernels();
  at::parallel_for(0, ceil_div(n, kEltChunk), grain_for(kEltChunk * 10), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t a = c * kEltChunk, len = std::min(kEltChunk, n - a);
      Kt.silu_mul_bwd_row(dyp + a * es, gp + a * es, up + a * es, dgp + a * es, dup + a * es, len, t);
    }
  });
  return {dg, du};
}

// Rotary embedding: x (B, T, H, D) contiguous, cos / sin (B, T, d), d even <= D; `backward`
// applies the transpose (the input gradient of the forward for the same cos / sin).
at::Tensor rope(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_, bool backward) {
  const char* op = "fastft::rope";
  const OutType t = row_type(x_, op, "x");
  same_type(op, x_, cos_, "x", "cos");
  same_type(op, x_, sin_, "x", "sin");
  TORCH_CHECK(x_.dim() == 4 && cos_.dim() == 3 && cos_.sizes() == sin_.sizes() && cos_.size(0) == x_.size(0) &&
                  cos_.size(1) == x_.size(1) && cos_.size(2) % 2 == 0 && cos_.size(2) <= x_.size(3),
              op, ": x must be (B, T, H, D) and cos / sin (B, T, d) with d even <= D, got ", x_.sizes(), ", ", cos_.sizes(), ", ",
              sin_.sizes());
  const at::Tensor x = x_.detach().contiguous(), c = cos_.detach().contiguous(), sn = sin_.detach().contiguous();
  const int64_t P = x.size(0) * x.size(1), H = x.size(2), D = x.size(3), d = c.size(2), es = x.element_size();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  const char* cp = static_cast<const char*>(c.const_data_ptr());
  const char* sp = static_cast<const char*>(sn.const_data_ptr());
  char* yp = static_cast<char*>(y.data_ptr());
  const KernelTable& Kt = kernels();
  at::parallel_for(0, P, grain_for(H * D * 4), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      Kt.rope_row(xp + p * H * D * es, cp + p * d * es, sp + p * d * es, yp + p * H * D * es, H, D, d, backward, t);
  });
  return y;
}

}  // namespace fastft

TORCH_LIBRARY_IMPL(fastft, CPU, m) {
  m.impl("nf4_quantize", &fastft::nf4_quantize);
  m.impl("quantize_blockwise_8bit", &fastft::quantize_blockwise_8bit);
  m.impl("dequantize_blockwise_8bit", &fastft::dequantize_blockwise_8bit);
  m.impl("nf4_dequantize", &fastft::nf4_dequantize);
  m.impl("nf4_dequantize_out", &fastft::nf4_dequantize_out);
  m.impl("nf4_matmul", &fastft::nf4_matmul);
  m.impl("nf4_matmul_grad_x", &fastft::nf4_matmul_grad_x);
  m.impl("int4_quantize", &fastft::int4_quantize);
  m.impl("int4_dequantize", &fastft::int4_dequantize);
  m.impl("int4_matmul", &fastft::int4_matmul);
  m.impl("int4_matmul_grad_x", &fastft::int4_matmul_grad_x);
  m.impl("ce_loss_grad_", &fastft::ce_loss_grad_);
  m.impl("attn_fwd", &fastft::attn_fwd);
  m.impl("attn_bwd", &fastft::attn_bwd);
  m.impl("rmsnorm_fwd", &fastft::rmsnorm_fwd);
  m.impl("rmsnorm_bwd", &fastft::rmsnorm_bwd);
  m.impl("silu_mul", &fastft::silu_mul);
  m.impl("silu_mul_bwd", &fastft::silu_mul_bwd);
  m.impl("rope", &fastft::rope);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastft C++ CPU kernels (NF4 / int4 quantize, dequantize, quant-matmul); ops live in torch.ops.fastft";
  m.def("isa", []() { return std::string(fastft::kernels().name); }, "Name of the kernel table in use (avx512, avx2, scalar).");
  m.def("set_isa", [](const std::string& name) { return fastft::set_isa(name.c_str()); },
        "Force a kernel table ('avx512', 'avx2', 'scalar' or 'auto'); False if this CPU cannot run it.");
  m.def("set_matmul_strategy", [](const std::string& s) {
    TORCH_CHECK(s == "tiled" || s == "full", "strategy must be 'tiled' or 'full', got ", s);
    fastft::g_strategy.store(s == "full" ? 1 : 0);
  }, "Quant-matmul strategy: 'tiled' (dequantize an L2-sized tile, then BLAS) or 'full' (whole-weight scratch).");
  m.def("matmul_strategy", []() { return std::string(fastft::g_strategy.load() ? "full" : "tiled"); });
  m.def("set_fused_max_m", [](int64_t m) { fastft::g_fused_max_m.store(m); },
        "Rows of x up to which the forward uses the fused dequantize-dot kernel instead of tiles + BLAS (0: never).");
  m.def("fused_max_m", []() { return fastft::g_fused_max_m.load(); });
  m.def("set_tile_elems", [](int64_t e) {
    TORCH_CHECK(e >= 1, "tile size must be positive");
    fastft::g_tile_elems.store(e);
  }, "Weight elements per dequantized quant-matmul tile.");
  m.def("tile_elems", []() { return fastft::g_tile_elems.load(); });
  m.def("set_attn_bf16", [](bool on) { fastft::g_attn_bf16.store(on ? 1 : 0); },
        "Use the AVX512-BF16 GEMMs for bf16 attention when the CPU has them (default on); off: the fp32-GEMM path.");
  m.def("attn_bf16", []() { return fastft::bf16_attn_kernels() != nullptr; },
        "Whether bf16 attention runs on the AVX512-BF16 GEMMs on this machine now.");
  m.def("set_reuse_cap", [](int64_t b) {
    TORCH_CHECK(b >= 0, "the reuse cap must be >= 0 bytes");
    fastft::g_reuse_cap.store(b);
    if (b == 0) fastft::reuse_clear();
  }, "Bytes of freed large outputs (>= 8 MiB each) kept for reuse by the next output of the same size (0: none).");
  m.def("reuse_cap", []() { return fastft::g_reuse_cap.load(); });
  m.def("reuse_cached_bytes", []() {
    auto& c = fastft::reuse_cache();
    std::lock_guard<std::mutex> g(c.m);
    return static_cast<int64_t>(c.bytes);
  }, "Bytes of freed output buffers currently held for reuse.");
  m.def("clear_reuse_cache", []() { fastft::reuse_clear(); }, "Return the cached output buffers to the system.");
  m.def("set_stream_bytes", [](int64_t b) { fastft::g_stream_bytes.store(b); },
        "Dequantized outputs of at least this many bytes use streaming (non-temporal) stores.");
  m.def("stream_bytes", []() { return fastft::g_stream_bytes.load(); });
}
