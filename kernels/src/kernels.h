// onnxopt CPU kernels: per-ISA implementations behind one dispatch table (like MLAS).
// Layouts are documented in kernels/README.md and onnxopt/ops.py.
#pragma once
#include <cstddef>
#include <cstdint>

namespace onnxopt {

// ---------------------------------------------------------------- BinaryMatMul
// The sign-bit layout a table's Binary kernels read: words of `groups` groups of `group_bits`
// consecutive K rows, one 32-bit lane per column, `block` columns per block:
// bits[NB][KW][block] with bit (group_bits*g + i) of bits[c, w, l] = (W[per_word*w + group_bits*g + i,
// block*c + l] >= 0), per_word = groups * group_bits. The op's input layout is {4, 8, 16}; a table
// with another layout converts it with binary_repack. The LUT of a row holds 2^group_bits floats per
// group: entry e of group G = sum_i (bit i of e ? +x : -x)[group_bits*G + i] (x = 0 past K).
struct BinaryLayout {
  int group_bits, groups, block;
  constexpr int64_t per_word() const { return (int64_t)group_bits * groups; }
  constexpr int64_t entries() const { return int64_t(1) << group_bits; }
};
inline constexpr BinaryLayout kBinaryOpLayout = {4, 8, 16};

struct BinaryParams {
  int64_t M, K, N, KW, NB;    // KW = ceil(K/per_word), NB = ceil(N/block) of the table's layout
  const uint32_t* bits;       // [NB][KW][block]
  const float* alpha;         // [N]
  const float* bias;          // [N] or null
  const float* lut;           // [M][KW*groups][entries]
  float* y;                   // [M][N]
};

// ---------------------------------------------------------------- XnorMatMul
// bits: uint64 [NB8][KW][8]; xbits: [M][KW] sign bits of X (padding 0), beta: [M].
struct XnorParams {
  int64_t M, K, N, KW, NB;    // KW = ceil(K/64), NB = ceil(N/8)
  const uint64_t* bits;
  const float* alpha;
  const float* bias;
  const uint64_t* xbits;
  const float* beta;
  float* y;
};

// ---------------------------------------------------------------- SparseMatMul
// CSC: column n holds entries col_ptr[n]:col_ptr[n+1]; entry j is W[indices[j], n] =
// values[j] * scales[n]. Indices are absolute rows (uint16 when K <= 65536, else uint32),
// validated < K before any kernel runs.
enum class ValType : int { F32 = 0, F16 = 1, I8 = 2 };
struct SparseParams {
  int64_t M, K, N;
  ValType vt;
  bool idx32;                 // indices are uint32 (else uint16)
  const void* values;         // [nnz]
  const void* indices;        // [nnz]
  const int32_t* col_ptr;     // [N+1]
  const float* scales;        // [N]
  const float* bias;          // [N] or null
  const float* x;             // [M][K] (row path)
  const float* xt;            // [ceil(M/32)][K][32]: X transposed in groups of 32 rows, zero padded,
                              // 64-byte aligned (each 32-float row is two cache lines)
  float* y;                   // [M][N]
};

// SparseMatMul, row walk for activations with many exact zeros (post-ReLU): a compressed-sparse-
// rows copy of W with the column scales folded into the values; rows k with x[k] == 0 are skipped.
// Each row is padded to a whole number of kStep entries with (column N, value 0), so a walk needs no
// remainder loop; accumulators hold N + 1 floats, the last one a sink for the padding.
// Columns are stored as uint16 byte offsets (4 x column) when N < kMaxOffsetN, which saves the walk the
// scaling of each index; as uint32 columns otherwise. float16 weights without column scales keep their
// fp16 values: 4 bytes per entry instead of 6 (MNIST fc1's copy 460 -> 310 KB; its standalone walk with
// the caches flushed between images 59-72 us instead of 76-97, end to end no change beyond noise).
//
// Rows with at least kDenseRow of their N (rounded up to chunks of 64) entries are kept dense
// instead, with no CSR entries: a live dense row costs N/8 register FMAs over a contiguous row rather
// than one scattered load-add-store per entry, and the scattered updates are what slows down when the
// core's other hardware thread is busy. Pruning by activity leaves such rows (MNIST fc1 at 90.5 %: 308
// of its 1568 rows hold 77 % of the weights, and their inputs are active less often than the others').
// fc1 alone in onnxruntime on Zen 3 over its real inputs: 20.8 -> 18.6 us best in quiet phases,
// 33-37 -> 27-31 us in contended ones; thresholds 0.1-0.3 measured, 0.2 the fastest by a little.
// Copies beyond kDenseBytes stream from memory, where bytes cost more than instructions: there only
// rows that the dense form makes no larger are dense (4096 x 4096 at 50-95 %: no change to the walk;
// with all rows a fifth full dense it was up to 1.3x slower). fp16 values stay fp16 in the dense rows too
// (fc1's dense copy 616 -> 308 KB, inside the 512 KB L2: the CNN 37-38 -> 34-35 us end to end).
// As in a dense MatMul, an infinite input times a dense row's zeros gives NaN.
struct SparseCsr {
  static constexpr int kStep = 4;
  static constexpr int64_t kMaxOffsetN = 16383;
  static constexpr int64_t kChunk = 64;     // dense rows: columns per chunk (eight AVX2 registers)
  static constexpr double kDenseRow = 0.2;
  static constexpr int64_t kDenseBytes = 4 << 20;  // copies larger: only rows the dense copy makes no larger
  int64_t K, N;
  bool idx32;                 // cols are uint32 columns (else uint16 byte offsets)
  bool f16;                   // values are fp16 (else float)
  const int32_t* row_ptr;     // [K+1], multiples of kStep
  const void* cols;           // [row_ptr[K]] output column of each entry (N: padding)
  const void* values;         // [row_ptr[K]] value * scale of its column (0: padding)
  int64_t D;                  // dense rows
  int64_t width;              // floats per accumulator row: N + 1 (the sink), whole chunks when D > 0
  const int32_t* dense_rows;  // [D] ascending rows of W
  const int32_t* dense_before;  // [K+1] dense rows before row k
  const void* dense;          // [ceil(N/kChunk)][D][kChunk]: value * scale, 0 past N; fp16 when f16
};

// SparseMatMul, panel GEMV (one input row, constant weights): the rows of W, in their own order
// or by nonzero count (whichever needs fewer steps), form panels of 32; its columns, ordered by
// nonzero count, form groups of 16 lanes.
// Segment (g, p) is `steps[g*P + p]` steps; a step holds per lane one row of panel p (0..31) and
// its value (column scale folded in; padding lanes hold 0). A kernel gathers a step's 16 inputs
// from the panel's 32 (two registers) by one permute, so no accumulator ever leaves registers.
struct SparsePanels {
  int64_t P, G;               // P = ceil(K/32) panels, G = ceil(N/16) groups
  bool rows_in_order;         // row_of[i] = i (else rows are ordered by nonzero count)
  const int32_t* row_of;      // [P*32] row of W at each panel position, -1 past K
  const int32_t* col_of;      // [G*16] column of W of each lane, -1 past N
  const uint8_t* steps;       // [G*P] steps of each segment, group-major
  const int64_t* group_step;  // [G+1] first step of each group
  const uint8_t* rows;        // [S][16] row within the panel, per step and lane
  const float* values;        // [S][16]
};

// ---------------------------------------------------------------- SparseConv
// 2-D convolution (group 1) whose weight is SparseMatMul's CSC of the GEMM view:
// row k = (c*kh + i)*kw + j, column = output channel. One image at a time.
struct SparseConvParams {
  SparseParams w;                     // M, x, xt, y unused; K = C*kh*kw, N = output channels
  int64_t C, kh, kw, sh, sw, dh, dw;
  int64_t Hp, Wp, OH, OW;             // padded input plane, output plane
  const int32_t* offset;              // [K]: start in xp of weight row k = (c*kh + i)*kw + j
  const float* xp;                    // [C][Hp][Wp] zero-padded image (+ kw*dw floats of slack)
  float* y;                           // the output channel's plane: [OH][OW], or [PH][PW] when pooled
  bool relu = false;                  // y = max(y, 0) (attribute activation="relu")
  int64_t ph = 0, pw = 0, psh = 1, psw = 1, PH = 0, PW = 0;  // folded MaxPool after the ReLU (ph = 0: none)
};

// ---------------------------------------------------------------- QuantMatMul
struct QuantParams {
  int64_t M, K, N, bits, bs, nb, NB;   // NB = ceil(N/16)
  const uint8_t* w;                    // [NB][nb][bs*2*bits]
  const void* scales;                  // [NB][nb][16] float or fp16
  bool scales_f16;
  const uint8_t* zp;                   // [NB][nb][16] or null (symmetric: zp = 2^(bits-1))
  const float* bias;
  const int8_t* xq;                    // [M][nb*bs]
  const float* sx;                     // [M][nb] activation scale
  const int32_t* sumx;                 // [M][nb] sum of xq over the block
  float* y;
};

struct KernelTable {
  const char* name;
  // Binary: the weight layout the kernels read; repack from the op's layout (null: they read it as is)
  BinaryLayout binary_layout;
  void (*binary_repack)(const uint32_t* bits, int64_t K, int64_t N, uint32_t* out);
  // build the per-row LUT from one row of x (K floats) -> KW*groups*entries floats
  void (*binary_lut)(const float* x, int64_t K, int64_t KW, float* lut);
  // rows [m0,m1), column blocks [c0,c1)
  void (*binary_gemm)(const BinaryParams& p, int64_t m0, int64_t m1, int64_t c0, int64_t c1);
  // Xnor: binarize one row -> KW words and beta
  void (*xnor_pack_x)(const float* x, int64_t K, int64_t KW, uint64_t* xbits, float* beta);
  // rows [m0,m1), column blocks of 8 [c0,c1)
  void (*xnor_gemm)(const XnorParams& p, int64_t m0, int64_t m1, int64_t c0, int64_t c1);
  // Sparse, row path (small M): rows [m0,m1), columns [n0,n1)
  void (*sparse_rows)(const SparseParams& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  // Sparse, transposed path (M >= 16): row groups of 32 [t0,t1), columns [n0,n1)
  void (*sparse_xt)(const SparseParams& p, int64_t t0, int64_t t1, int64_t n0, int64_t n1);
  // Sparse, row walk: acc[width] += x[k0:k1] . W[k0:k1, :], skipping zero x (CSR rows and dense rows)
  void (*sparse_csr_acc)(const SparseCsr& w, const float* x, int64_t k0, int64_t k1, float* acc);
  // Sparse, panel GEMV: xp = one row x (K) in panel order, zero padded to P*32 (64-byte aligned)
  void (*sparse_panel_input)(const SparsePanels& w, const float* x, int64_t K, float* xp);
  // groups [g0,g1) of y = xp . W (+ bias)
  void (*sparse_panels)(const SparsePanels& w, const float* xp, const float* bias, int64_t g0, int64_t g1, float* y);
  // ns per panel step, used to choose the panel GEMV over the row walk and the column path
  // (0: never chosen by cost, only when forced by ONNXOPT_SPARSE_PATH=panels)
  float sparse_panel_step_ns;
  // SparseConv: output channel co of one image; acc: OH*Wp floats of scratch
  void (*sparse_conv_plane)(const SparseConvParams& p, int64_t co, float* acc);
  // SparseConv: one input plane src (H x W) into dst (Hp x Wp), pt rows and pl columns of zeros before
  void (*sparse_conv_pad)(const float* src, int64_t H, int64_t W, int64_t pt, int64_t pl, int64_t Hp, int64_t Wp, float* dst);
  // Quant: quantize one row of x into xq (nb*bs), sx (nb), sumx (nb)
  void (*quant_x)(const float* x, int64_t K, int64_t bs, int64_t nb, int8_t* xq, float* sx, int32_t* sumx);
  // rows [m0,m1), column blocks of 16 [c0,c1)
  void (*quant_gemm)(const QuantParams& p, int64_t m0, int64_t m1, int64_t c0, int64_t c1);
};

const KernelTable* GetKernelTableScalar();
const KernelTable* GetKernelTableAvx2();
const KernelTable* GetKernelTableAvx512();

// Selects the table: env ONNXOPT_ISA (scalar|avx2|avx512) if set and supported (else throws
// std::runtime_error when it names an unsupported level), otherwise the best supported one.
const KernelTable* SelectKernelTable();
bool IsaSupported(const char* name);

// fp16 <-> fp32 (portable)
float HalfToFloat(uint16_t h);

}  // namespace onnxopt
