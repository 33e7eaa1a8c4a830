// Portable level: the generic kernels compiled for baseline x86-64 (or any other target).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace onnxopt {
namespace isa_scalar {
#include "kernels_generic.inc"
}  // namespace isa_scalar

const KernelTable* GetKernelTableScalar() {
  using namespace isa_scalar;
  static const KernelTable t = {"scalar", kBinaryOpLayout, nullptr, g_binary_lut,  g_binary_gemm, g_xnor_pack_x, g_xnor_gemm,
                                g_sparse_rows<>, g_sparse_xt,   g_sparse_csr_acc, g_sparse_panel_input, g_sparse_panels, 0.0f, g_sparse_conv_plane, g_sparse_conv_pad, g_quant_x, g_quant_gemm};
  return &t;
}
}  // namespace onnxopt
