// AVX2 level: the generic kernels compiled with -mavx2 -mfma -mf16c -mpopcnt -mbmi2
// (auto-vectorized), with the XNOR popcount loop using hardware popcnt.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace onnxopt {
namespace isa_avx2 {
#include "kernels_generic.inc"
}  // namespace isa_avx2

const KernelTable* GetKernelTableAvx2() {
#if defined(ONNXOPT_HAVE_AVX2)
  using namespace isa_avx2;
  static const KernelTable t = {"avx2",        g_binary_lut,  g_binary_gemm, g_xnor_pack_x, g_xnor_gemm,
                                g_sparse_rows, g_sparse_xt,   g_sparse_csr_acc, g_sparse_conv_plane, g_quant_x, g_quant_gemm};
  return &t;
#else
  return nullptr;
#endif
}
}  // namespace onnxopt
