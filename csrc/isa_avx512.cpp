// The avx512 build of the inner loops in isa_kernels.inc (see kernels.h for why these files
// include no torch headers). Standard headers come before the target switch so that their inline
// functions keep the baseline ISA; only the kernels below are compiled for avx512.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")
#define FASTFT_AVX512 1
#define FASTFT_ISA_NS isa_avx512
#define FASTFT_ISA_NAME "avx512"
#include "isa_kernels.inc"

namespace fastft {
const KernelTable* table_avx512() { return &isa_avx512::kTable; }
}  // namespace fastft
#else
namespace fastft {
const KernelTable* table_avx512() { return nullptr; }  // not an x86-64 build
}  // namespace fastft
#endif
