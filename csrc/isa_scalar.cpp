// The portable build of the inner loops in isa_kernels.inc: baseline target, no intrinsics (the
// compiler still auto-vectorises with SSE2 on x86-64). Runs on any CPU and serves as the
// in-extension oracle for the SIMD paths in the tests.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

#define FASTFT_ISA_NS isa_scalar
#define FASTFT_ISA_NAME "scalar"
#include "isa_kernels.inc"

namespace fastft {
const KernelTable* table_scalar() { return &isa_scalar::kTable; }
}  // namespace fastft
