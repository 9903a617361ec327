// padfree's native small-batch path: the whole post-LN layer stack of a short batch in one call.
//
// Per layer: the QKV product, attention per (sequence, head), the output product, residual add and LayerNorm, the
// FFN-in product and its activation in place, the FFN-out product, residual add and LayerNorm. At a handful of tokens
// each op costs microseconds, and Python between them cost as much again (benchmarks/NOTES.md, section 17); here
// there is none, and the GIL is released for the whole stack. The products, the attention of sequences of at most
// 128 tokens, the activation and the residual add fused with LayerNorm are this file's kernels, split over the
// threads, in AVX-512 or in AVX2 + FMA: the caller names the instruction set of each call (isa: "avx512", "avx2",
// or "aten" for ATen's ops), from what cpu_runs says this build and CPU run and from its measurements; the products
// the caller hands over as oneDNN's or MKL's packings are those libraries' (fp32 batches above the native product's
// range). The stack computes in fp32: a bf16 model's batch runs on its bf16 weights, widened in registers or (AVX-512
// BF16) in bf16 dot products (x rounded to bf16 for each product, and q, k, v and the attention's weights for the
// attention's), and the caller rounds the result to bf16 once: faster than oneDNN's bf16 products at these sizes and
// more exact than a bf16 forward (NOTES.md, sections 18, 19 and 21). The SIMD code is x86-64's alone; elsewhere the
// module builds with ATen's ops only (isa "aten").
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#if defined(__x86_64__) && !defined(PADFREE_NO_SIMD)  // the SIMD kernels; elsewhere ATen's ops alone
#define PADFREE_X86 1
#include <immintrin.h>
#else
#define PADFREE_X86 0
#endif
#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

using at::Tensor;

namespace {

Tensor mkl_linear(const Tensor& x, const Tensor& packed, const Tensor& weight, const Tensor& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkl::_mkl_linear", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                     int64_t)>();
  return op.call(x, packed, weight, bias, x.size(0));
}

// oneDNN's fp32 product on its packing of the weight (torch.ops.mkldnn._reorder_linear_weight)
Tensor onednn_linear(const Tensor& x, const Tensor& packed, const Tensor& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::string_view,
                                     c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>)>();
  return op.call(x, packed, bias, "none", c10::List<std::optional<c10::Scalar>>(), "none");
}

// ---- torch's OpenMP workers, one per CPU ----
// Pins the OpenMP worker threads that serve the calling thread's parallel regions (torch's intra-op threads: libgomp
// keeps a team per calling thread) each to its own CPU, the caller itself left free; only where the process may run
// on exactly as many CPUs as torch has threads (a machine or container of its own: with more CPUs than threads,
// several processes would pin their workers to the same ones). Unpinned, the scheduler sometimes put a spinning
// worker on the CPU its caller needed and stalled the call for a scheduler slice (benchmarks/NOTES.md, section 19).
// Once per calling thread and team size; returns whether it pinned now.
bool pin_workers() {
  thread_local int64_t pinned_for = 0;  // the team size this thread's workers were pinned for
  const int64_t threads = at::get_num_threads();
  if (threads < 2 || pinned_for == threads || omp_in_parallel()) return false;
  pinned_for = threads;
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return false;
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  if (static_cast<int64_t>(cpus.size()) != threads) return false;
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int i = omp_get_thread_num();
    if (i > 0) {
      cpu_set_t one;
      CPU_ZERO(&one);
      CPU_SET(cpus[i], &one);
      sched_setaffinity(0, sizeof(one), &one);
    }
  }
  return true;
}

// ---- the instruction set: the caller's choice ----
// Each kernel entry point takes the instruction set it runs on as its last argument (isa): "avx512" (AVX-512 F/BW;
// bf16 dot products, pack_pairs' packings, also need AVX-512 BF16), "avx2" (AVX2 and FMA: 8-lane versions of the
// fp32 kernels and of the product on a widened bf16 weight; no bf16 dot products), or "aten" (ATen's ops where ATen
// has them). The caller picks per CPU from its measurements (cpu_runs says what this build and this CPU can run); an
// ISA the CPU cannot run, or an unknown one, is an error naming it, never a silent fallback.
enum class Isa { aten, avx2, avx512 };

#if PADFREE_X86
bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return ok;
}

bool has_avx512_bf16() {
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

// Why this build on this CPU cannot run `name` (avx512, avx512_bf16 or avx2); empty where it can
std::string lacks(const std::string& name) {
#if PADFREE_X86
  if (name == "avx2") return has_avx2() ? "" : "this CPU lacks AVX2 or FMA";
  if (name == "avx512") return has_avx512() ? "" : "this CPU lacks AVX-512 F/BW";
  return has_avx512_bf16() ? "" : has_avx512() ? "this CPU lacks AVX-512 BF16" : "this CPU lacks AVX-512 F/BW and BF16";
#else
  return "this build has no x86 SIMD code (not an x86-64 machine)";
#endif
}

// Whether this build has the code of `name` (avx512, avx512_bf16: its bf16 dot products, avx2) and this CPU runs it
bool cpu_runs(const std::string& name) {
  TORCH_CHECK(name == "avx512" || name == "avx512_bf16" || name == "avx2", "cpu_runs: unknown instruction set '", name,
              "' (avx512, avx512_bf16 or avx2)");
  return lacks(name).empty();
}

// The ISA an entry point (op) was asked to run on, checked against this build and CPU
Isa parse_isa(const std::string& isa, const char* op) {
  if (isa == "aten") return Isa::aten;
  TORCH_CHECK(isa == "avx512" || isa == "avx2", op, ": unknown isa '", isa, "' (avx512, avx2 or aten)");
  const std::string why = lacks(isa);
  TORCH_CHECK(why.empty(), op, ": isa '", isa, "' cannot run here: ", why);
  return isa == "avx2" ? Isa::avx2 : Isa::avx512;
}

// bf16 dot products (pack_pairs' packings, dot attention): AVX-512 BF16's alone
void check_dot(Isa isa, const char* op) {
  TORCH_CHECK(isa == Isa::avx512, op, ": bf16 dot products (pack_pairs' packings) need isa 'avx512' with AVX-512 BF16, "
              "got isa '", isa == Isa::avx2 ? "avx2" : "aten", "'");
  const std::string why = lacks("avx512_bf16");
  TORCH_CHECK(why.empty(), op, ": bf16 dot products (isa 'avx512' with AVX-512 BF16) cannot run here: ", why);
}

// ---- the product of a short batch: y [T, N] = x [T, K] @ W^T + bias; x, y, bias fp32; W fp32 or bf16 ----
// At a few dozen rows a product is a pass over its weight, which comes from the last-level cache or memory (a model's
// weights do not fit the 2 MiB L2): the kernel streams the weight once per 12 rows in blocks of 32 columns packed
// contiguously, on Intel CPUs prefetching 4 KiB ahead of its loads, which the Xeon's hardware prefetcher alone does
// not keep fed (own_prefetch). The caller gives it the batches where it beats MKL's and oneDNN's products and hands
// larger fp32 batches those libraries' packings (benchmarks/NOTES.md, sections 18 and 19). At 13-16 rows a block
// takes two calls of at most 8 rows: the first streams it from memory, the second finds it in L2 and, so that memory
// does not idle while it computes, prefetches the thread's next block into L2 (with more rows a call, its compute
// alone covers the next block's memory time: section 20). A bf16 weight is half the bytes, widened to fp32 in
// registers (block) or used in bf16 dot products (block_pairs).
constexpr int64_t kCols = 32;     // output columns per block: two 16-lane fp32 vectors
constexpr int kRows = 12;         // rows per kernel call: 24 accumulators, 2 weight vectors, 1 broadcast in registers
constexpr int kSplit = 11;        // rows per call where a block takes several: the 12-row kernel keeps 12 row
                                  // pointers and spills one per step (section 21)
constexpr int64_t kAhead = 4096;  // prefetch distance in bytes
constexpr int64_t kQCols = 16;    // output columns per panel of an int8 packing (pack_int8)

// weight [N, K] -> [ceil(N / 32), K, 32], columns padded with zeros. fp32 in column order; bf16 in the word order
// that unpacking each 128-bit lane against zeros (low words, then high words) turns into columns 0-15 and 16-31 as
// fp32: word 8L + i holds column 4L + i (i < 4) or 16 + 4L + i - 4 (i >= 4).
Tensor pack_blocks(const Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "pack_blocks: an fp32 or bf16 [N, K] weight");
  const int64_t N = weight.size(0), K = weight.size(1), blocks = (N + kCols - 1) / kCols;
  std::vector<int64_t> order(kCols);
  for (int64_t p = 0; p < kCols; ++p) {
    const int64_t lane = p / 8, i = p % 8;
    order[p] = weight.scalar_type() == at::kFloat ? p : i < 4 ? 4 * lane + i : 16 + 4 * lane + i - 4;
  }
  auto padded = at::zeros({blocks * kCols, K}, weight.options());
  padded.slice(0, 0, N).copy_(weight);
  const auto index = at::tensor(order, at::kLong);
  return padded.view({blocks, kCols, K}).index_select(1, index).transpose(1, 2).contiguous();
}

// bf16 weight [N, K] -> [ceil(N / 32), ceil(K / 2), 32, 2] for block_pairs: each column's k in pairs, one 32-bit
// word per (pair, column); columns and an odd K's last pair padded with zeros.
Tensor pack_pairs(const Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "pack_pairs: a bf16 [N, K] weight");
  const int64_t N = weight.size(0), K = weight.size(1), blocks = (N + kCols - 1) / kCols, pairs = (K + 1) / 2;
  auto padded = at::zeros({blocks * kCols, 2 * pairs}, weight.options());
  padded.slice(0, 0, N).slice(1, 0, K).copy_(weight);
  return padded.view({blocks, kCols, pairs, 2}).permute({0, 2, 1, 3}).contiguous();
}

enum class Act : int { none, gelu, gelu_tanh, relu, silu };  // none: the identity (round_bf16's plain rounding)

Act parse_activation(const std::string& activation) {
  if (activation == "gelu") return Act::gelu;
  if (activation == "gelu_tanh") return Act::gelu_tanh;
  if (activation == "relu") return Act::relu;
  TORCH_CHECK(activation == "silu", "post_ln_layers: unknown activation ", activation);
  return Act::silu;
}

// Rows of at most this many floats per thread: fewer run on the calling thread alone
constexpr int64_t kNormGrain = 32768;

// A table's row index of each token, checked: an index out of range is an error, never a read past the table
const int64_t* table_index(const Tensor& index, const Tensor& table, int64_t T, const char* name) {
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.numel() == T,
              "embed_layer_norm: ", name, " must be a contiguous int64 tensor of one index a token");
  const int64_t *p = index.data_ptr<int64_t>(), rows = table.size(0);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(p[t] >= 0 && p[t] < rows, "embed_layer_norm: ", name, " ", p[t], " is outside [0, ", rows, ")");
  return p;
}

// ---- attention of short sequences ----
// Per (sequence, head): the keys transposed so that a query's scores are 16-lane vectors over the keys, then groups
// of kGroup query rows: their scores, softmax and context, the products in tiles of R rows x up to kTile vectors
// (keys, or features), so that each loaded vector serves R rows and each broadcast kTile vectors, with the softmax's
// one horizontal step per row (faster than one vector by 8 rows: NOTES.md, section 21).
// In fp32 (fp32 FMAs), or for a bf16 model on AMD (BF16_DOT) on bf16 dot products: q, k, v and the softmax's
// weights rounded to bf16, features (scores) or keys (context) in pairs, half the instructions where vdpbf16ps runs
// at the FMA rate, with the roundings of a bf16 attention (PyTorch's bf16 kernel takes q, k, v and the weights in
// bf16 too; section 21). Accumulation, softmax and scaling are fp32 in both.
constexpr int64_t kMaxLen = 128;  // the longest sequence attend() takes (8 score vectors); PyTorch's kernel above
constexpr int64_t kGroup = 6;     // query rows attend_rows() takes at once
constexpr int kTile = 4;          // vectors a tile takes at once: R x kTile accumulators
constexpr int64_t kKeyStride = kMaxLen + 16;  // elements per row of the transposed keys (not a power of two)
// The tiles' loops over rows and vectors fully unrolled: left to itself GCC kept the context's accumulators in
// memory, storing them at every step (section 21)
#define PADFREE_UNROLL _Pragma("GCC unroll 24")

// Calls f with std::integral_constant<int, v> (v = 1 ... Max, the ISA's widest tile): a tile's width as a template
// argument
template <int Max, typename F>
inline void with_width(int64_t v, F&& f) {
  if constexpr (Max > 1)
    if (v < Max) return with_width<Max - 1>(v, std::forward<F>(f));
  f(std::integral_constant<int, Max>());
}

// One thread's scratch for a head of at most kMaxLen tokens and d features (dpad: d rounded up to 16): the keys
// transposed, the scores and weights, and for dot products q in bf16 rows (words: feature pairs), v in key pairs
// ([kMaxLen / 2][dpad] words) and the weights in bf16 (words: key pairs). Keys: [d][kKeyStride] floats, or
// [dpad / 2][kKeyStride] words (more than d rows where d < 8).
struct Scratch {
  std::vector<float> kt, p;
  std::vector<uint16_t> q, row, w;
  std::vector<uint32_t> v;
  Scratch(int64_t d, bool dot)
      : kt(std::max(d, pad16(d) / 2) * kKeyStride), p(kGroup * kMaxLen), q(dot ? kMaxLen * pad16(d) : 0),
        row(dot ? pad16(d) : 0), w(dot ? kGroup * kMaxLen : 0), v(dot ? kMaxLen / 2 * pad16(d) : 0) {}
  static int64_t pad16(int64_t d) { return (d + 15) / 16 * 16; }
};
#if PADFREE_X86

// The AVX-512 code below is compiled for AVX-512 F/BW whatever the build's flags, and runs only where the CPU has
// them (has_avx512); elsewhere the stack keeps ATen's ops.
#define PADFREE_AVX512 __attribute__((target("avx512f,avx512bw")))
#define PADFREE_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

// The lanes of a 16-lane vector that hold one of the `left` values still to go (all 16 when 16 or more are left)
inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// Whether a call prefetches its own block kAhead ahead of its loads: not on AMD's CPUs. On Intel's Xeon the hardware
// prefetcher alone did not keep the stream fed (section 18); on AMD's Zen 4 it does, and the software prefetch only
// cost time (section 20)
bool own_prefetch() {
  static const bool on = !__builtin_cpu_is("amd");
  return on;
}

// Prefetches the lines of one k step (`bytes` at `offset` in a block): of the own block (`own`, where given), kAhead
// further on, into L1, and of the next block (`next`, where given) into L2. Always inlined: left to itself GCC
// judged a function of prefetches alone free of side effects and dropped its calls (tests/test_native.py counts the
// built module's prefetches).
__attribute__((always_inline)) PADFREE_AVX512 inline void prefetch_step(const char* own, const char* next,
                                                                         int64_t offset, int64_t bytes) {
  if (own)
    for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(own + kAhead + offset + line, _MM_HINT_T0);
  if (next)
    for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(next + offset + line, _MM_HINT_T1);
}

// 32 weights of one k as two fp32 vectors (columns 0-15, 16-31)
PADFREE_AVX512 inline void load32(const float* w, __m512& w0, __m512& w1) {
  w0 = _mm512_loadu_ps(w);
  w1 = _mm512_loadu_ps(w + 16);
}
PADFREE_AVX512 inline void load32(const at::BFloat16* w, __m512& w0, __m512& w1) {
  const __m512i raw = _mm512_loadu_si512(w), zero = _mm512_setzero_si512();  // bf16 = the fp32 high halves
  w0 = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, raw));
  w1 = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, raw));
}

// Each row's 32 accumulators plus bias into y (the first `cols` columns real)
template <int R>
PADFREE_AVX512 inline void store_rows(const __m512 (&acc)[R][2], const float* bias, float* y, int64_t N,
                                      int64_t cols) {
  const __mmask16 lo = lanes(cols), hi = lanes(cols - 16);
  const __m512 b0 = _mm512_maskz_loadu_ps(lo, bias), b1 = _mm512_maskz_loadu_ps(hi, bias + 16);
  for (int m = 0; m < R; ++m) {
    _mm512_mask_storeu_ps(y + m * N, lo, _mm512_add_ps(acc[m][0], b0));
    _mm512_mask_storeu_ps(y + m * N + 16, hi, _mm512_add_ps(acc[m][1], b1));
  }
}

// R rows of x times one block of 32 columns, plus bias, into y
template <typename W, int R, bool Fetch>
PADFREE_AVX512 void block(const float* x, int64_t K, const W* w, const float* bias, float* y, int64_t N, int64_t cols,
                          const char* next) {
  __m512 acc[R][2];
  for (int m = 0; m < R; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  constexpr int64_t bytes = kCols * sizeof(W);  // one k step of the block
  const char* own = Fetch && own_prefetch() ? reinterpret_cast<const char*>(w) : nullptr;
  for (int64_t k = 0; k < K; ++k) {
    if (Fetch) prefetch_step(own, next, k * bytes, bytes);
    __m512 w0, w1;
    load32(w + k * kCols, w0, w1);
    for (int m = 0; m < R; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * K + k]);
      acc[m][0] = _mm512_fmadd_ps(xb, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(xb, w1, acc[m][1]);
    }
  }
  store_rows<R>(acc, bias, y, N, cols);
}

// The same on bf16 dot products (vdpbf16ps): x as bf16 pairs (2 k each, [T, P] words), the weight as pack_pairs'
// block ([P, 32] words: a word holds one column's two k); fp32 accumulators. Where the CPU runs vdpbf16ps at the
// fp32 FMA rate (AMD's Zen 4) this is twice the flops of widening the weight (benchmarks/NOTES.md, section 19).
template <int R, bool Fetch>
PADFREE_AVX512_BF16 void block_pairs(const uint32_t* x, int64_t P, const uint32_t* w, const float* bias, float* y,
                                     int64_t N, int64_t cols, const char* next) {
  __m512 acc[R][2];
  for (int m = 0; m < R; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  constexpr int64_t bytes = kCols * 4;  // one pair of k of the block
  const char* own = Fetch && own_prefetch() ? reinterpret_cast<const char*>(w) : nullptr;
  for (int64_t p = 0; p < P; ++p) {
    if (Fetch) prefetch_step(own, next, p * bytes, bytes);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + p * kCols);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + p * kCols + 16);
    for (int m = 0; m < R; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(x[m * P + p]));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
    }
  }
  store_rows<R>(acc, bias, y, N, cols);
}

template <typename X, typename W>
using BlockFn = void (*)(const X*, int64_t, const W*, const float*, float*, int64_t, int64_t, const char*);
// A product's kernels: [rows - 1] without prefetches, [kRows + rows - 1] with them: a loop that checked for
// prefetches at each step (on AMD none but the next-block one) ran slower than one without the checks (NOTES.md,
// section 21).
template <typename X, typename W>
using Kernels = std::array<BlockFn<X, W>, 2 * kRows>;
template <typename W, size_t... R>
constexpr Kernels<float, W> block_table(std::index_sequence<R...>) {
  return {block<W, int(R) + 1, false>..., block<W, int(R) + 1, true>...};
}
template <size_t... R>
constexpr Kernels<uint32_t, uint32_t> pairs_table(std::index_sequence<R...>) {
  return {block_pairs<int(R) + 1, false>..., block_pairs<int(R) + 1, true>...};
}

// Blocks of 32 columns split over the threads; each block's weight (K steps x 32 columns) serves every row of x
// (K: the depth in x's and the weight's units, k or pairs of k); where a block takes two calls of at most 8 rows,
// the second prefetches the thread's next block.
template <typename X, typename W>
void blocks_product(const Kernels<X, W>& table, const X* x, int64_t T, int64_t K, const W* w, int64_t blocks,
                    const float* bias, float* y, int64_t N) {
  if (T == 0) return;
  // one call of at most kRows rows (one pass over the weight), or rows split evenly over calls of at most kSplit
  const int64_t calls = T <= kRows ? 1 : (T + kSplit - 1) / kSplit, step = (T + calls - 1) / calls;
  const int64_t own = own_prefetch() ? kRows : 0;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) {
      const int64_t n0 = j * kCols, cols = std::min(kCols, N - n0);
      const bool share = calls == 2 && step <= 8 && j + 1 < last;
      const char* next = share ? reinterpret_cast<const char*>(w + (j + 1) * K * kCols) : nullptr;
      for (int64_t m0 = 0; m0 < T; m0 += step) {
        const int64_t rows = std::min<int64_t>(step, T - m0);
        const char* fetch = m0 ? next : nullptr;
        table[(fetch ? kRows : own) + rows - 1](x + m0 * K, K, w + j * K * kCols, bias + n0, y + m0 * N + n0, N, cols,
                                                fetch);
      }
    }
  });
}

// ---- vector math: e^x, erf and the activations on 16 fp32 lanes ----
// e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2 (ln 2 split in two for an exact reduction), e^r by its
// Taylor series to r^7 (truncation below 6e-9 relative); x clamped to fp32's range.
PADFREE_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// 1 / x: the 14-bit estimate and one Newton step (about 1 ulp; a division's latency is the loop's bottleneck)
PADFREE_AVX512 inline __m512 rcp16(__m512 x) {
  const __m512 r = _mm512_rcp14_ps(x);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.f)));
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7; ATen's vectorised erf uses the same formula)
PADFREE_AVX512 inline __m512 erf16(__m512 x) {
  const __m512 a = _mm512_abs_ps(x), one = _mm512_set1_ps(1.f);
  const __m512 t = rcp16(_mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, one));
  __m512 p = _mm512_set1_ps(1.061405429f);
  for (const float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f})
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c));
  const __m512 minus_a2 = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a);
  const __m512 y = _mm512_fnmadd_ps(_mm512_mul_ps(p, t), exp16(minus_a2), one);
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(int(0x80000000u)));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign));
}

template <Act act>
PADFREE_AVX512 inline __m512 act16(__m512 x) {
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.f);
  if constexpr (act == Act::gelu) {  // x/2 (1 + erf(x / sqrt 2))
    const __m512 erf = erf16(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)));
    return _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, erf));
  } else if constexpr (act == Act::gelu_tanh) {  // x/2 (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3)
    const __m512 cubic = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x);
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.79788456080286536f), cubic);
    const __m512 e = exp16(_mm512_add_ps(u, u));  // tanh u = 1 - 2 / (1 + e^2u)
    const __m512 tanh = _mm512_fnmadd_ps(_mm512_set1_ps(2.f), rcp16(_mm512_add_ps(one, e)), one);
    return _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, tanh));
  } else if constexpr (act == Act::relu) {
    return _mm512_max_ps(x, _mm512_setzero_ps());
  } else if constexpr (act == Act::none) {
    return x;
  } else {  // silu: x / (1 + e^-x)
    return _mm512_mul_ps(x, rcp16(_mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)))));
  }
}

template <Act act>
PADFREE_AVX512 void act_span(float* p, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(p + i, act16<act>(_mm512_loadu_ps(p + i)));
  if (i < n) _mm512_mask_storeu_ps(p + i, lanes(n - i), act16<act>(_mm512_maskz_loadu_ps(lanes(n - i), p + i)));
}

// act(x) rounded to bf16 (to nearest even), n values
template <Act act>
PADFREE_AVX512_BF16 void round_span(const float* x, at::BFloat16* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i),
                        (__m256i)_mm512_cvtneps_pbh(act16<act>(_mm512_loadu_ps(x + i))));
  if (i < n) {
    alignas(64) at::BFloat16 tail[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tail),
                       (__m256i)_mm512_cvtneps_pbh(act16<act>(_mm512_maskz_loadu_ps(lanes(n - i), x + i))));
    std::copy(tail, tail + (n - i), y + i);
  }
}

// act(x) as bf16 (x contiguous fp32), split over the threads: the input of a product on bf16 dot products, rounded
// in one pass with the activation before it, in place of ATen's conversion, a pass of its own (section 21)
Tensor round_bf16(const Tensor& x, Act act) {
  TORCH_CHECK(has_avx512_bf16() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "round_bf16: a contiguous fp32 tensor and AVX-512 BF16");
  auto y = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  const float* src = x.data_ptr<float>();
  at::BFloat16* dst = y.data_ptr<at::BFloat16>();
  const auto span = act == Act::none        ? round_span<Act::none>
                    : act == Act::gelu      ? round_span<Act::gelu>
                    : act == Act::gelu_tanh ? round_span<Act::gelu_tanh>
                    : act == Act::relu      ? round_span<Act::relu>
                                            : round_span<Act::silu>;
  at::parallel_for(0, x.numel(), 16384, [&](int64_t first, int64_t last) {
    span(src + first, dst + first, last - first);
  });
  return y;
}

// ---- residual add and LayerNorm, fused: y = LayerNorm(y + x) in place ----
// One row at a time: the sum (stored) and its mean, the variance about the mean (two passes, as exact as ATen's), the
// normalised row; three passes over a row that stays in L1, in place of ATen's add and layer_norm, whose dispatch
// is most of their cost at a handful of rows (section 20). Rows split over the threads only where there are enough
// of them.
// One row: row = LayerNorm(row + res) (res: none, or the residual row; beta: none, or the bias)
PADFREE_AVX512 inline void norm_row(float* row, const float* res, const float* gamma, const float* beta, int64_t H,
                                    float eps) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < H; i += 16) {
    const __mmask16 m = lanes(H - i);
    __m512 v = _mm512_maskz_loadu_ps(m, row + i);
    if (res) {
      v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, res + i));
      _mm512_mask_storeu_ps(row + i, m, v);
    }
    sum = _mm512_add_ps(sum, v);
  }
  const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / float(H));
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < H; i += 16) {
    const __mmask16 m = lanes(H - i);
    const __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, row + i), mean);
    squares = _mm512_fmadd_ps(d, d, squares);
  }
  const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / float(H) + eps));
  for (int64_t i = 0; i < H; i += 16) {
    const __mmask16 m = lanes(H - i);
    const __m512 normed = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + i), mean), rstd);
    const __m512 g = _mm512_maskz_loadu_ps(m, gamma + i);
    const __m512 b = beta ? _mm512_maskz_loadu_ps(m, beta + i) : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(row + i, m, _mm512_fmadd_ps(normed, g, b));
  }
}

// ---- embeddings: LayerNorm(word[id] + position[pos] + token_type[type]), a token at a time ----
// The rows of the tables (fp32 or bf16) summed in fp32 and normalised in place: one pass where ATen's path took
// three lookups, two adds and a LayerNorm, each dispatched on its own (section 20).
PADFREE_AVX512 inline __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
PADFREE_AVX512 inline __m512 widen16(const at::BFloat16* p) {  // bf16 = the fp32 high halves
  const __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
}

template <typename E>
PADFREE_AVX512 void embed_rows(const std::array<const E*, 3>& rows, float* out, int64_t D) {
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) {
    __m512 sum = widen16(rows[0] + i);
    for (int r = 1; r < 3; ++r)
      if (rows[r]) sum = _mm512_add_ps(sum, widen16(rows[r] + i));
    _mm512_storeu_ps(out + i, sum);
  }
  for (; i < D; ++i) {  // a row size off 16 lanes: the rest one by one (no load past a table's last row)
    float sum = float(rows[0][i]);
    for (int r = 1; r < 3; ++r)
      if (rows[r]) sum += float(rows[r][i]);
    out[i] = sum;
  }
}

// fp32 and bf16-pair operands of the tiles: X one element of a broadcast row (a float, or a word of two bf16)
template <int R, int V>
__attribute__((noinline)) PADFREE_AVX512 void score_tile(const float* q, int64_t ldq, const float* kt, int64_t b0,
                                                         int64_t depth, float scale, float* p) {
  __m512 acc[R][V];
  PADFREE_UNROLL for (int r = 0; r < R; ++r) PADFREE_UNROLL for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t c = 0; c < depth; ++c) {
    __m512 kc[V];
    PADFREE_UNROLL for (int v = 0; v < V; ++v) kc[v] = _mm512_loadu_ps(kt + c * kKeyStride + 16 * (b0 + v));
    PADFREE_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r * ldq + c]);
      PADFREE_UNROLL for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(qb, kc[v], acc[r][v]);
    }
  }
  PADFREE_UNROLL for (int r = 0; r < R; ++r) PADFREE_UNROLL for (int v = 0; v < V; ++v)
    _mm512_storeu_ps(p + r * kMaxLen + 16 * (b0 + v), _mm512_mul_ps(acc[r][v], _mm512_set1_ps(scale)));
}

template <int R, int V>
__attribute__((noinline)) PADFREE_AVX512_BF16 void score_tile(const uint32_t* q, int64_t ldq, const uint32_t* kt,
                                                              int64_t b0, int64_t depth, float scale, float* p) {
  __m512 acc[R][V];
  PADFREE_UNROLL for (int r = 0; r < R; ++r) PADFREE_UNROLL for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t c = 0; c < depth; ++c) {
    __m512bh kc[V];
    PADFREE_UNROLL for (int v = 0; v < V; ++v)
      kc[v] = (__m512bh)_mm512_loadu_si512(kt + c * kKeyStride + 16 * (b0 + v));
    PADFREE_UNROLL for (int r = 0; r < R; ++r) {
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(int(q[r * ldq + c]));
      PADFREE_UNROLL for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], qb, kc[v]);
    }
  }
  PADFREE_UNROLL for (int r = 0; r < R; ++r) PADFREE_UNROLL for (int v = 0; v < V; ++v)
    _mm512_storeu_ps(p + r * kMaxLen + 16 * (b0 + v), _mm512_mul_ps(acc[r][v], _mm512_set1_ps(scale)));
}

// The context of R query rows in V vectors of features from c0: their weights w (rows of kMaxLen elements) times the
// values (rows of ldv elements, `depth` of them), each row scaled by inv, into out (the last vector `last` lanes wide)
template <int R, int V>
__attribute__((noinline)) PADFREE_AVX512 void context_tile(const float* w, const float* v, int64_t ldv, int64_t depth,
                                                           int64_t c0, __mmask16 last, const float* inv, float* out,
                                                           int64_t ldo) {
  __m512 acc[R][V];
  __mmask16 mk[V];
  PADFREE_UNROLL for (int u = 0; u < V; ++u) mk[u] = u + 1 < V ? __mmask16(0xFFFF) : last;
  PADFREE_UNROLL for (int r = 0; r < R; ++r) PADFREE_UNROLL for (int u = 0; u < V; ++u) acc[r][u] = _mm512_setzero_ps();
  for (int64_t j = 0; j < depth; ++j) {
    __m512 vj[V];
    PADFREE_UNROLL for (int u = 0; u < V; ++u) vj[u] = _mm512_maskz_loadu_ps(mk[u], v + j * ldv + c0 + 16 * u);
    PADFREE_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 wb = _mm512_set1_ps(w[r * kMaxLen + j]);
      PADFREE_UNROLL for (int u = 0; u < V; ++u) acc[r][u] = _mm512_fmadd_ps(wb, vj[u], acc[r][u]);
    }
  }
  PADFREE_UNROLL for (int r = 0; r < R; ++r) PADFREE_UNROLL for (int u = 0; u < V; ++u)
    _mm512_mask_storeu_ps(out + r * ldo + c0 + 16 * u, mk[u], _mm512_mul_ps(acc[r][u], _mm512_set1_ps(inv[r])));
}

template <int R, int V>
__attribute__((noinline)) PADFREE_AVX512_BF16 void context_tile(const uint32_t* w, const uint32_t* v, int64_t ldv,
                                                                int64_t depth, int64_t c0, __mmask16 last,
                                                                const float* inv, float* out, int64_t ldo) {
  __m512 acc[R][V];  // w: rows of kMaxLen bf16 (kMaxLen / 2 words); v: rows of ldv words, zero-padded features
  PADFREE_UNROLL for (int r = 0; r < R; ++r) PADFREE_UNROLL for (int u = 0; u < V; ++u) acc[r][u] = _mm512_setzero_ps();
  for (int64_t j = 0; j < depth; ++j) {
    __m512bh vj[V];
    PADFREE_UNROLL for (int u = 0; u < V; ++u) vj[u] = (__m512bh)_mm512_loadu_si512(v + j * ldv + c0 + 16 * u);
    PADFREE_UNROLL for (int r = 0; r < R; ++r) {
      const __m512bh wb = (__m512bh)_mm512_set1_epi32(int(w[r * (kMaxLen / 2) + j]));
      PADFREE_UNROLL for (int u = 0; u < V; ++u) acc[r][u] = _mm512_dpbf16_ps(acc[r][u], wb, vj[u]);
    }
  }
  PADFREE_UNROLL for (int r = 0; r < R; ++r) PADFREE_UNROLL for (int u = 0; u < V; ++u)
    _mm512_mask_storeu_ps(out + r * ldo + c0 + 16 * u, u + 1 < V ? __mmask16(0xFFFF) : last,
                          _mm512_mul_ps(acc[r][u], _mm512_set1_ps(inv[r])));
}

// The softmax of R rows of scores p (rows of kMaxLen) over the n real keys, left unnormalised: e^(s - max) in place
// (zeros from key n to the end of its 16-key block), 1 / sum into inv
template <int R>
PADFREE_AVX512 void softmax_rows(float* p, int64_t n, float* inv) {
  const int64_t blocks = (n + 15) / 16;
  for (int r = 0; r < R; ++r) {
    float* pr = p + r * kMaxLen;
    __m512 most = _mm512_set1_ps(-INFINITY), sums = _mm512_setzero_ps();  // one horizontal step each, per row
    for (int64_t b = 0; b < blocks; ++b)
      most = _mm512_mask_max_ps(most, lanes(n - 16 * b), most, _mm512_loadu_ps(pr + 16 * b));
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(most));
    for (int64_t b = 0; b < blocks; ++b) {
      const __m512 e = _mm512_maskz_mov_ps(lanes(n - 16 * b), exp16(_mm512_sub_ps(_mm512_loadu_ps(pr + 16 * b), top)));
      sums = _mm512_add_ps(sums, e);
      _mm512_storeu_ps(pr + 16 * b, e);
    }
    inv[r] = 1.f / _mm512_reduce_add_ps(sums);
  }
}

// 16 fp32 values (the first `m` lanes, zeros after) rounded to bf16, stored as 16 bf16 (32 bytes)
PADFREE_AVX512_BF16 inline void store_bf16(uint16_t* dst, const float* src, __mmask16 m) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src)));
}

// R consecutive query rows of one head (R <= kGroup): q rows at a stride of ldq (floats, or words of feature
// pairs); the keys transposed and v (fp32 rows at a stride of ldv, or key pairs) as attend() prepared them
template <int R, typename X>
PADFREE_AVX512 void attend_rows(const X* q, int64_t ldq, const X* kt, const X* v, int64_t ldv, Scratch& s, float* out,
                                int64_t ldo, int64_t n, int64_t d, float scale) {
  constexpr bool dot = std::is_same_v<X, uint32_t>;
  const int64_t blocks = (n + 15) / 16, features = (d + 15) / 16;
  const int64_t depth = dot ? features * 8 : d;  // of the scores: features, or pairs of them (zero-padded)
  float* p = s.p.data();
  for (int64_t b = 0; b < blocks; b += kTile)
    with_width<kTile>(std::min<int64_t>(kTile, blocks - b),
                      [&](auto V) { score_tile<R, decltype(V)::value>(q, ldq, kt, b, depth, scale, p); });
  float inv[R];
  softmax_rows<R>(p, n, inv);
  const X* w = reinterpret_cast<const X*>(p);
  if constexpr (dot) {  // the weights as bf16, zeros past key n to its block's end (and so in an odd n's last pair)
    for (int r = 0; r < R; ++r)
      for (int64_t b = 0; b < blocks; ++b)
        store_bf16(s.w.data() + r * kMaxLen + 16 * b, p + r * kMaxLen + 16 * b, 0xFFFF);
    w = reinterpret_cast<const X*>(s.w.data());
  }
  for (int64_t f = 0; f < features; f += kTile) {
    const int64_t width = std::min<int64_t>(kTile, features - f);
    const __mmask16 last = lanes(d - 16 * (f + width - 1));
    with_width<kTile>(width, [&](auto V) {
      context_tile<R, decltype(V)::value>(w, v, ldv, dot ? (n + 1) / 2 : n, 16 * f, last, inv, out, ldo);
    });
  }
}

// softmax(q k^T scale) v for one head of one sequence of n <= kMaxLen tokens: q, k, v rows at a stride of ld
// floats (rows of [T, 3H]), d features; out rows at a stride of ldo
PADFREE_AVX512 void attend(const float* q, const float* k, const float* v, int64_t ld, float* out, int64_t ldo,
                           int64_t n, int64_t d, float scale, Scratch& s) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < d; ++c) s.kt[c * kKeyStride + j] = k[j * ld + c];
  using Rows = void (*)(const float*, int64_t, const float*, const float*, int64_t, Scratch&, float*, int64_t,
                        int64_t, int64_t, float);
  static constexpr Rows rows[kGroup] = {attend_rows<1, float>, attend_rows<2, float>, attend_rows<3, float>,
                                        attend_rows<4, float>, attend_rows<5, float>, attend_rows<6, float>};
  for (int64_t i = 0; i < n; i += kGroup)
    rows[std::min(kGroup, n - i) - 1](q + i * ld, ld, s.kt.data(), v, ld, s, out + i * ldo, ldo, n, d, scale);
}

// attend() on bf16 dot products: q, k and v rounded to bf16 into the scratch's layouts (an odd d or n padded with
// zeros), then the same groups of query rows
PADFREE_AVX512_BF16 void attend_dot(const float* q, const float* k, const float* v, int64_t ld, float* out,
                                    int64_t ldo, int64_t n, int64_t d, float scale, Scratch& s) {
  const int64_t features = (d + 15) / 16, dpad = 16 * features, pairs = dpad / 2;
  auto* kt = reinterpret_cast<uint32_t*>(s.kt.data());
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t f = 0; f < features; ++f) {
      const __mmask16 m = lanes(d - 16 * f);
      store_bf16(s.q.data() + j * dpad + 16 * f, q + j * ld + 16 * f, m);
      store_bf16(s.row.data() + 16 * f, k + j * ld + 16 * f, m);
    }
    const auto* kw = reinterpret_cast<const uint32_t*>(s.row.data());
    for (int64_t c = 0; c < pairs; ++c) kt[c * kKeyStride + j] = kw[c];
  }
  for (int64_t j = 0; j < n; j += 2) {  // words (v[j][f], v[j + 1][f]), zeros past n
    for (int64_t f = 0; f < features; ++f) {
      const __mmask16 m = lanes(d - 16 * f);
      const __m512i lo = _mm512_cvtepu16_epi32(
          (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, v + j * ld + 16 * f)));
      const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(
          _mm512_maskz_loadu_ps(j + 1 < n ? m : __mmask16(0), v + (j + 1) * ld + 16 * f)));
      _mm512_storeu_si512(s.v.data() + j / 2 * dpad + 16 * f, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
  using Rows = void (*)(const uint32_t*, int64_t, const uint32_t*, const uint32_t*, int64_t, Scratch&, float*,
                        int64_t, int64_t, int64_t, float);
  static constexpr Rows rows[kGroup] = {attend_rows<1, uint32_t>, attend_rows<2, uint32_t>, attend_rows<3, uint32_t>,
                                        attend_rows<4, uint32_t>, attend_rows<5, uint32_t>, attend_rows<6, uint32_t>};
  const auto* qw = reinterpret_cast<const uint32_t*>(s.q.data());
  for (int64_t i = 0; i < n; i += kGroup)
    rows[std::min(kGroup, n - i) - 1](qw + i * pairs, pairs, kt, s.v.data(), dpad, s, out + i * ldo, ldo, n, d, scale);
}

// ---- AVX2 + FMA: the fp32 kernels on 8 lanes ----
// The kernels above for CPUs without AVX-512 (AMD's Zen 2 and 3, Intel's client cores): 8-lane vectors and 16
// registers, no masks (AVX2's lane-masked loads and stores for the tails), no scalef or rcp14 (2^n built in the
// exponent field, 1 / x as rcp_ps and Newton steps). A product reads pack_blocks' packing (both ISAs share it); bf16
// weights are widened in registers (AVX2 has no bf16 dot products). The intrinsics differ and so do the tile shapes
// (what fits 16 registers); the drivers' structure is the AVX-512 kernels'.
#define PADFREE_AVX2 __attribute__((target("avx2,fma")))

namespace avx2 {

// The lanes of an 8-lane vector that hold one of the `left` values still to go, as an integer mask (all-ones lanes)
PADFREE_AVX2 inline __m256i lanes(int64_t left) {
  const int n = int(std::min<int64_t>(std::max<int64_t>(left, 0), 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 floats, or the first `left` of them (zeros after; no access past them)
PADFREE_AVX2 inline __m256 load8(const float* p, int64_t left) {
  return left >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes(left));
}

PADFREE_AVX2 inline void store8(float* p, int64_t left, __m256 v) {
  if (left >= 8)
    _mm256_storeu_ps(p, v);
  else
    _mm256_maskstore_ps(p, lanes(left), v);
}

PADFREE_AVX2 inline float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

PADFREE_AVX2 inline float reduce_max(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// -- the product --
// A block's 32 columns are four 8-lane vectors; 16 registers hold 4 x 2 rows' accumulators with the 4 weight vectors
// and a broadcast (kWhole rows over the whole block), or the accumulators of 2 vectors (half the block) x 6 rows
// with 2 weight vectors and a broadcast: 8 loads per 12 FMAs. The first pass over a block streams it from memory;
// passes over one half each read every other 64-byte line of it, which the EPYC (Zen 3) streamed much slower than
// the whole block in order. So 1-2 rows take one whole-block call; more rows a whole-block call of 2 rows first where
// the block is larger than L1 (32 KiB: fp32 at K > 256, bf16 at K > 512; below that size the extra pass cost more
// than it saved), then the rest in even calls of at most kHalfRows over the halves, from L2 (or L1). The whole-block
// call prefetches the block kAhead on where there are at most kFetchRows rows (it paid at 1-4 rows and cost at
// 16-32). Measurements: benchmarks/NOTES.md, section 22.
constexpr int kWhole = 2;
constexpr int kHalfRows = 6;
constexpr int64_t kFetchRows = 8;
constexpr int64_t kL1 = 32768;

// Half h (0, 1) of one k step of a block as two fp32 vectors: an fp32 weight's columns 16h-16h+7 and 16h+8-16h+15;
// a bf16 one's (pack_blocks' word order: a 32-byte load unpacked against zeros per 128-bit lane, low words then
// high) columns 8h-8h+7 and 16+8h-16+8h+7. Both from element 16h of the step.
PADFREE_AVX2 inline void load_half(const float* w, __m256& a, __m256& b) {
  a = _mm256_loadu_ps(w);
  b = _mm256_loadu_ps(w + 8);
}
PADFREE_AVX2 inline void load_half(const at::BFloat16* w, __m256& a, __m256& b) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), zero = _mm256_setzero_si256();
  a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));  // bf16 = the fp32 high halves
  b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
}

// The first column of vector v (0, 1) of half h of a block
template <typename W>
constexpr int64_t half_column(int h, int v) {
  return std::is_same_v<W, float> ? 16 * h + 8 * v : 8 * h + 16 * v;
}

// R rows of x times a whole block (V = 4 vectors) or its half h (V = 2), plus bias, into y (the first `cols`
// columns of the block real)
template <typename W, int V, int R, bool Fetch>
PADFREE_AVX2 void block(const float* x, int64_t K, const W* w, const float* bias, float* y, int64_t N, int64_t cols,
                        int h) {
  __m256 acc[R][V];
  PADFREE_UNROLL for (int m = 0; m < R; ++m) PADFREE_UNROLL for (int u = 0; u < V; ++u) acc[m][u] = _mm256_setzero_ps();
  const W* wh = w + (V == 4 ? 0 : 16 * h);
  for (int64_t k = 0; k < K; ++k) {
    __m256 wv[V];
    if constexpr (Fetch)  // the block's lines kAhead on, into L1
      for (int64_t line = 0; line < int64_t(kCols * sizeof(W)); line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(wh + k * kCols) + kAhead + line, _MM_HINT_T0);
    load_half(wh + k * kCols, wv[0], wv[1]);
    if constexpr (V == 4) load_half(wh + k * kCols + 16, wv[2], wv[3]);
    PADFREE_UNROLL for (int m = 0; m < R; ++m) {
      const __m256 xb = _mm256_broadcast_ss(x + m * K + k);
      PADFREE_UNROLL for (int u = 0; u < V; ++u) acc[m][u] = _mm256_fmadd_ps(xb, wv[u], acc[m][u]);
    }
  }
  PADFREE_UNROLL for (int u = 0; u < V; ++u) {
    const int64_t c = half_column<W>(V == 4 ? u / 2 : h, u % 2), left = cols - c;
    if (left <= 0) continue;
    const __m256 b = load8(bias + c, left);
    PADFREE_UNROLL for (int m = 0; m < R; ++m) store8(y + m * N + c, left, _mm256_add_ps(acc[m][u], b));
  }
}

template <typename W>
using BlockFn = void (*)(const float*, int64_t, const W*, const float*, float*, int64_t, int64_t, int);
template <typename W, size_t... R>
constexpr std::array<BlockFn<W>, kHalfRows> half_table(std::index_sequence<R...>) {
  return {block<W, 2, int(R) + 1, false>...};
}

// Blocks of 32 columns split over the threads, as the AVX-512 blocks_product; per block the calls above
template <typename W>
void blocks_product(const float* x, int64_t T, int64_t K, const W* w, int64_t blocks, const float* bias, float* y,
                    int64_t N) {
  static constexpr auto half = half_table<W>(std::make_index_sequence<kHalfRows>());
  static constexpr std::array<BlockFn<W>, 2 * kWhole> whole = {block<W, 4, 1, false>, block<W, 4, 2, false>,
                                                               block<W, 4, 1, true>, block<W, 4, 2, true>};
  if (T == 0) return;
  const int64_t lead = T <= kWhole ? T : K * kCols * int64_t(sizeof(W)) > kL1 ? kWhole : 0;  // whole-block rows
  const int64_t fetch = T <= kFetchRows ? kWhole : 0, rest = T - lead;
  const int64_t calls = (rest + kHalfRows - 1) / kHalfRows, step = calls ? (rest + calls - 1) / calls : 1;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) {
      const int64_t n0 = j * kCols, cols = std::min(kCols, N - n0);
      const W* wj = w + j * K * kCols;
      if (lead) whole[fetch + lead - 1](x, K, wj, bias + n0, y + n0, N, cols, 0);
      if (rest && rest <= kWhole) {  // 3-4 rows: the rest over the whole block again, from L2
        whole[rest - 1](x + lead * K, K, wj, bias + n0, y + lead * N + n0, N, cols, 0);
        continue;
      }
      for (int64_t m0 = lead; m0 < T; m0 += step) {
        const int64_t rows = std::min(step, T - m0);
        for (int h = 0; h < 2; ++h) half[rows - 1](x + m0 * K, K, wj, bias + n0, y + m0 * N + n0, N, cols, h);
      }
    }
  });
}

// -- vector math: as exp16, rcp16, erf16, act16 --
// e^x with x clamped to [-87.3, 88.3]: n = round(x / ln 2) in [-126, 127], 2^n built in the exponent field
PADFREE_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

// 1 / x: the 12-bit estimate and two Newton steps (one leaves ~2^-23 relative, which GELU-tanh's 1 - 2 / (1 + e)
// turns into 1e-6 absolute at |x| = 10)
PADFREE_AVX2 inline __m256 rcp8(__m256 x) {
  const __m256 two = _mm256_set1_ps(2.f);
  __m256 r = _mm256_rcp_ps(x);
  r = _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, two));
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, two));
}

PADFREE_AVX2 inline __m256 erf8(__m256 x) {
  const __m256 sign_bit = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f);
  const __m256 a = _mm256_andnot_ps(sign_bit, x);
  const __m256 t = rcp8(_mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, one));
  __m256 p = _mm256_set1_ps(1.061405429f);
  for (const float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f})
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(c));
  const __m256 minus_a2 = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), a), a);
  const __m256 y = _mm256_fnmadd_ps(_mm256_mul_ps(p, t), exp8(minus_a2), one);
  return _mm256_or_ps(y, _mm256_and_ps(x, sign_bit));
}

template <Act act>
PADFREE_AVX2 inline __m256 act8(__m256 x) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f);
  if constexpr (act == Act::gelu) {
    const __m256 erf = erf8(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)));
    return _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, erf));
  } else if constexpr (act == Act::gelu_tanh) {
    const __m256 cubic = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x), _mm256_mul_ps(x, x), x);
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.79788456080286536f), cubic);
    const __m256 e = exp8(_mm256_add_ps(u, u));
    const __m256 tanh = _mm256_fnmadd_ps(_mm256_set1_ps(2.f), rcp8(_mm256_add_ps(one, e)), one);
    return _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, tanh));
  } else if constexpr (act == Act::relu) {
    return _mm256_max_ps(x, _mm256_setzero_ps());
  } else if constexpr (act == Act::none) {
    return x;
  } else {
    return _mm256_mul_ps(x, rcp8(_mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)))));
  }
}

template <Act act>
PADFREE_AVX2 void act_span(float* p, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(p + i, act8<act>(_mm256_loadu_ps(p + i)));
  if (i < n) store8(p + i, n - i, act8<act>(load8(p + i, n - i)));
}

// -- residual add and LayerNorm: as the AVX-512 norm_row, the tails through lane masks --
PADFREE_AVX2 inline void norm_row(float* row, const float* res, const float* gamma, const float* beta, int64_t H,
                                  float eps) {
  __m256 sum = _mm256_setzero_ps();
  for (int64_t i = 0; i < H; i += 8) {
    __m256 v = load8(row + i, H - i);
    if (res) {
      v = _mm256_add_ps(v, load8(res + i, H - i));
      store8(row + i, H - i, v);
    }
    sum = _mm256_add_ps(sum, v);
  }
  const __m256 mean = _mm256_set1_ps(reduce_add(sum) / float(H));
  __m256 squares = _mm256_setzero_ps();
  for (int64_t i = 0; i < H; i += 8) {
    __m256 d = _mm256_sub_ps(load8(row + i, H - i), mean);
    if (H - i < 8) d = _mm256_and_ps(d, _mm256_castsi256_ps(lanes(H - i)));
    squares = _mm256_fmadd_ps(d, d, squares);
  }
  const __m256 rstd = _mm256_set1_ps(1.f / std::sqrt(reduce_add(squares) / float(H) + eps));
  for (int64_t i = 0; i < H; i += 8) {
    const __m256 normed = _mm256_mul_ps(_mm256_sub_ps(load8(row + i, H - i), mean), rstd);
    const __m256 b = beta ? load8(beta + i, H - i) : _mm256_setzero_ps();
    store8(row + i, H - i, _mm256_fmadd_ps(normed, load8(gamma + i, H - i), b));
  }
}

// -- embeddings --
PADFREE_AVX2 inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
PADFREE_AVX2 inline __m256 widen8(const at::BFloat16* p) {
  const __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
}

template <typename E>
PADFREE_AVX2 void embed_rows(const std::array<const E*, 3>& rows, float* out, int64_t D) {
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    __m256 sum = widen8(rows[0] + i);
    for (int r = 1; r < 3; ++r)
      if (rows[r]) sum = _mm256_add_ps(sum, widen8(rows[r] + i));
    _mm256_storeu_ps(out + i, sum);
  }
  for (; i < D; ++i) {
    float sum = float(rows[0][i]);
    for (int r = 1; r < 3; ++r)
      if (rows[r]) sum += float(rows[r][i]);
    out[i] = sum;
  }
}

// -- attention: as the AVX-512 attend (fp32 alone), scores over 8-key vectors, groups of kGroup query rows in tiles
// of R rows x up to kTile vectors: 4 x 3 accumulators, 3 loaded vectors and a broadcast fill the 16 registers --
constexpr int64_t kGroup = 4;
constexpr int kTile = 3;

template <int R, int V>
__attribute__((noinline)) PADFREE_AVX2 void score_tile(const float* q, int64_t ldq, const float* kt, int64_t b0,
                                                       int64_t depth, float scale, float* p) {
  __m256 acc[R][V];
  PADFREE_UNROLL for (int r = 0; r < R; ++r) PADFREE_UNROLL for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t c = 0; c < depth; ++c) {
    __m256 kc[V];
    PADFREE_UNROLL for (int v = 0; v < V; ++v) kc[v] = _mm256_loadu_ps(kt + c * kKeyStride + 8 * (b0 + v));
    PADFREE_UNROLL for (int r = 0; r < R; ++r) {
      const __m256 qb = _mm256_broadcast_ss(q + r * ldq + c);
      PADFREE_UNROLL for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(qb, kc[v], acc[r][v]);
    }
  }
  PADFREE_UNROLL for (int r = 0; r < R; ++r) PADFREE_UNROLL for (int v = 0; v < V; ++v)
    _mm256_storeu_ps(p + r * kMaxLen + 8 * (b0 + v), _mm256_mul_ps(acc[r][v], _mm256_set1_ps(scale)));
}

// The context of R rows in V vectors of features from c0 (the last `last` lanes wide: Partial where below 8)
template <int R, int V, bool Partial>
__attribute__((noinline)) PADFREE_AVX2 void context_tile(const float* w, const float* v, int64_t ldv, int64_t depth,
                                                         int64_t c0, int64_t last, const float* inv, float* out,
                                                         int64_t ldo) {
  const __m256i mk = lanes(last);
  __m256 acc[R][V];
  PADFREE_UNROLL for (int r = 0; r < R; ++r) PADFREE_UNROLL for (int u = 0; u < V; ++u) acc[r][u] = _mm256_setzero_ps();
  for (int64_t j = 0; j < depth; ++j) {
    __m256 vj[V];
    PADFREE_UNROLL for (int u = 0; u < V; ++u) {
      const float* src = v + j * ldv + c0 + 8 * u;
      vj[u] = Partial && u + 1 == V ? _mm256_maskload_ps(src, mk) : _mm256_loadu_ps(src);
    }
    PADFREE_UNROLL for (int r = 0; r < R; ++r) {
      const __m256 wb = _mm256_broadcast_ss(w + r * kMaxLen + j);
      PADFREE_UNROLL for (int u = 0; u < V; ++u) acc[r][u] = _mm256_fmadd_ps(wb, vj[u], acc[r][u]);
    }
  }
  PADFREE_UNROLL for (int r = 0; r < R; ++r) PADFREE_UNROLL for (int u = 0; u < V; ++u) {
    float* dst = out + r * ldo + c0 + 8 * u;
    const __m256 y = _mm256_mul_ps(acc[r][u], _mm256_set1_ps(inv[r]));
    if (Partial && u + 1 == V)
      _mm256_maskstore_ps(dst, mk, y);
    else
      _mm256_storeu_ps(dst, y);
  }
}

// e^(s - max) in place over the n real keys (zeros from key n to the end of its 8-key block), 1 / sum into inv
template <int R>
PADFREE_AVX2 void softmax_rows(float* p, int64_t n, float* inv) {
  const int64_t blocks = (n + 7) / 8;
  const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
  for (int r = 0; r < R; ++r) {
    float* pr = p + r * kMaxLen;
    __m256 most = minus_inf, sums = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      __m256 s = _mm256_loadu_ps(pr + 8 * b);
      if (n - 8 * b < 8) s = _mm256_blendv_ps(minus_inf, s, _mm256_castsi256_ps(lanes(n - 8 * b)));
      most = _mm256_max_ps(most, s);
    }
    const __m256 top = _mm256_set1_ps(reduce_max(most));
    for (int64_t b = 0; b < blocks; ++b) {
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(pr + 8 * b), top));
      if (n - 8 * b < 8) e = _mm256_and_ps(e, _mm256_castsi256_ps(lanes(n - 8 * b)));
      sums = _mm256_add_ps(sums, e);
      _mm256_storeu_ps(pr + 8 * b, e);
    }
    inv[r] = 1.f / reduce_add(sums);
  }
}

template <int R>
PADFREE_AVX2 void attend_rows(const float* q, int64_t ldq, const float* kt, const float* v, int64_t ldv, Scratch& s,
                              float* out, int64_t ldo, int64_t n, int64_t d, float scale) {
  const int64_t blocks = (n + 7) / 8, features = (d + 7) / 8;
  float* p = s.p.data();
  for (int64_t b = 0; b < blocks; b += kTile)
    with_width<kTile>(std::min<int64_t>(kTile, blocks - b),
                      [&](auto V) { score_tile<R, decltype(V)::value>(q, ldq, kt, b, d, scale, p); });
  float inv[R];
  softmax_rows<R>(p, n, inv);
  for (int64_t f = 0; f < features; f += kTile) {
    const int64_t width = std::min<int64_t>(kTile, features - f), last = d - 8 * (f + width - 1);
    with_width<kTile>(width, [&](auto V) {
      if (last < 8)
        context_tile<R, decltype(V)::value, true>(p, v, ldv, n, 8 * f, last, inv, out, ldo);
      else
        context_tile<R, decltype(V)::value, false>(p, v, ldv, n, 8 * f, last, inv, out, ldo);
    });
  }
}

PADFREE_AVX2 void attend(const float* q, const float* k, const float* v, int64_t ld, float* out, int64_t ldo,
                         int64_t n, int64_t d, float scale, Scratch& s) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < d; ++c) s.kt[c * kKeyStride + j] = k[j * ld + c];
  using Rows = void (*)(const float*, int64_t, const float*, const float*, int64_t, Scratch&, float*, int64_t,
                        int64_t, int64_t, float);
  static constexpr Rows rows[kGroup] = {attend_rows<1>, attend_rows<2>, attend_rows<3>, attend_rows<4>};
  for (int64_t i = 0; i < n; i += kGroup)
    rows[std::min(kGroup, n - i) - 1](q + i * ld, ld, s.kt.data(), v, ld, s, out + i * ldo, ldo, n, d, scale);
}

// -- int8 products: y [M, N] = act(sx * sw * (xq @ wq^T) + bias) (+ residual) --
// The weight is quantized per output column to int8 (pack_int8: sw = max|w| / 127), x per row to `levels` levels
// (quantize_rows: sx = max|x| / levels, xq = round(x / sx); default_levels: 12 bits). Both are held as int16 values so
// that vpmaddwd multiplies pairs of k exactly into int32 (AVX2 has no 8-bit product that is exact for 8-bit signed
// operands: vpmaddubsw saturates its int16 pair sums; benchmarks/NOTES.md, sections 25 and 26). The weight is stored
// as int8 and sign-extended in registers (a quarter of fp32's bytes). A panel is 16 columns: per pair of k, 32 bytes,
// two 8-lane vectors once widened; a call takes kQRows rows over one panel and the whole of K, its 12 accumulators
// exact int32 (|sum| <= K * 127 * levels < 2^31: check_levels).
constexpr int kQRows = 6;

// One row: x [K] fp32 -> q [padded] int16 in [-levels, levels] (zeros past K); returns its scale sx
PADFREE_AVX2 float quantize_row(const float* x, int64_t K, int16_t* q, int64_t padded, float levels) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + k), magnitude));
  if (k < K) mx = _mm256_max_ps(mx, _mm256_and_ps(load8(x + k, K - k), magnitude));
  const float amax = reduce_max(mx), inv = amax > 0 ? levels / amax : 0.f;
  const __m256 scale = _mm256_set1_ps(inv);
  for (k = 0; k + 16 <= K; k += 16) {  // packs_epi32 interleaves the 128-bit lanes: the permute restores the order
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), scale));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), scale));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
  }
  for (; k < K; ++k) q[k] = int16_t(std::nearbyint(x[k] * inv));  // round half to even, as cvtps_epi32
  for (; k < padded; ++k) q[k] = 0;
  return amax > 0 ? amax / levels : 1.f;
}

// R rows of xq (ldx int16 apart, pairs of k) times one panel w, dequantized with the rows' scales xs and the
// columns' ws, plus bias (may be null), activated, plus residual (Res: res, N apart), into y (the first `cols` of
// the panel's columns real)
template <int R, Act A, bool Res>
PADFREE_AVX2 void qblock(const int16_t* xq, int64_t ldx, int64_t pairs, const int8_t* w, const float* xs,
                         const float* ws, const float* bias, const float* res, float* y, int64_t N, int64_t cols) {
  __m256i acc[R][2];
  PADFREE_UNROLL for (int m = 0; m < R; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 32 * p)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 32 * p + 16)));
    PADFREE_UNROLL for (int m = 0; m < R; ++m) {
      int32_t pair;
      std::memcpy(&pair, xq + m * ldx + 2 * p, sizeof(pair));
      const __m256i a = _mm256_set1_epi32(pair);
      acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(a, w0));
      acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(a, w1));
    }
  }
  PADFREE_UNROLL for (int u = 0; u < 2; ++u) {
    const int64_t c = 8 * u, left = cols - c;
    if (left <= 0) continue;
    const __m256 sw = load8(ws + c, left), b = bias ? load8(bias + c, left) : _mm256_setzero_ps();
    PADFREE_UNROLL for (int m = 0; m < R; ++m) {
      __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][u]), _mm256_mul_ps(sw, _mm256_set1_ps(xs[m])), b);
      v = act8<A>(v);
      if constexpr (Res) v = _mm256_add_ps(v, load8(res + m * N + c, left));
      store8(y + m * N + c, left, v);
    }
  }
}

using QBlockFn = void (*)(const int16_t*, int64_t, int64_t, const int8_t*, const float*, const float*, const float*,
                          const float*, float*, int64_t, int64_t);
template <Act A, bool Res, size_t... R>
constexpr std::array<QBlockFn, kQRows> qblock_table(std::index_sequence<R...>) {
  return {qblock<int(R) + 1, A, Res>...};
}
template <Act A, bool Res>
constexpr auto qblocks = qblock_table<A, Res>(std::make_index_sequence<kQRows>());

// The kernels of an epilogue (activation, residual or not)
const std::array<QBlockFn, kQRows>& qblocks_for(Act act, bool res) {
  switch (act) {
    case Act::gelu: return res ? qblocks<Act::gelu, true> : qblocks<Act::gelu, false>;
    case Act::gelu_tanh: return res ? qblocks<Act::gelu_tanh, true> : qblocks<Act::gelu_tanh, false>;
    case Act::relu: return res ? qblocks<Act::relu, true> : qblocks<Act::relu, false>;
    case Act::silu: return res ? qblocks<Act::silu, true> : qblocks<Act::silu, false>;
    case Act::none: break;
  }
  return res ? qblocks<Act::none, true> : qblocks<Act::none, false>;
}

// Rows are taken in chunks of even sizes whose quantized x fits in L2 beside a panel (at most kQChunk bytes): each
// thread runs a chunk's rows over a range of panels, the panel reused from L1/L2 by every kQRows rows of the chunk.
// Chunks are split over the threads; where there are too few of them for the threads (short batches), the panels
// are split too.
constexpr int64_t kQChunk = 196608;

void qproduct(const int16_t* xq, const float* xs, int64_t M, int64_t pairs, const int8_t* w, const float* ws,
              int64_t panels, const float* bias, const float* res, float* y, int64_t N, Act act) {
  if (M == 0 || N == 0) return;
  const auto& table = qblocks_for(act, res != nullptr);
  const int64_t ldx = 2 * pairs;
  const int64_t most = std::max<int64_t>(kQRows, kQChunk / (ldx * 2) / kQRows * kQRows);
  const int64_t threads = at::get_num_threads(), least = (M + most - 1) / most;
  // as many chunks for each thread (or one each, where there are few rows); each cut into `parts` panel ranges
  const int64_t chunks = least >= threads ? (least + threads - 1) / threads * threads : least;
  const int64_t rows = ((M + chunks - 1) / chunks + kQRows - 1) / kQRows * kQRows;  // chunks of even sizes
  const int64_t parts = chunks >= threads ? 1 : std::min(panels, threads);
  const int64_t per_part = (panels + parts - 1) / parts;
  at::parallel_for(0, chunks * parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t m_begin = task / parts * rows, m_end = std::min(M, m_begin + rows);
      const int64_t j_begin = task % parts * per_part, j_end = std::min(panels, j_begin + per_part);
      for (int64_t j = j_begin; j < j_end; ++j) {
        const int64_t n0 = j * kQCols, cols = std::min(kQCols, N - n0);
        const int8_t* wj = w + j * pairs * 2 * kQCols;
        for (int64_t m0 = m_begin; m0 < m_end; m0 += kQRows) {
          const int64_t r = std::min<int64_t>(kQRows, m_end - m0);
          table[r - 1](xq + m0 * ldx, ldx, pairs, wj, xs + m0, ws + n0, bias ? bias + n0 : nullptr,
                       res ? res + m0 * N + n0 : nullptr, y + m0 * N + n0, N, cols);
        }
      }
    }
  });
}

}  // namespace avx2

#endif  // PADFREE_X86

// ---- the entry points: each runs on the ISA its caller names (isa, last) ----

// x [T, K] fp32 @ W^T + bias on the native product, W [N, K] packed by pack_blocks (pairs false: [blocks, K, 32], fp32
// products, the weight fp32 or bf16 widened; avx512 or avx2) or by pack_pairs (pairs true: [blocks, K / 2, 32, 2], x
// rounded to bf16, bf16 dot products; avx512 with AVX-512 BF16; x may come in bf16); fp32 bias and result [T, N]. op:
// the entry point, named in errors.
Tensor multiply_packed(const Tensor& x, const Tensor& packed, int64_t N, const Tensor& bias, bool pairs, Isa isa,
                       const char* op) {
  TORCH_CHECK(isa != Isa::aten, op, ": needs isa 'avx2' or 'avx512' (ATen has no product on pack_blocks' "
              "or pack_pairs' packings), got 'aten'");
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK((x.scalar_type() == at::kFloat || (pairs && x.scalar_type() == at::kBFloat16)) && x.is_contiguous() &&
                  packed.size(0) * kCols >= N &&
                  (pairs ? packed.dim() == 4 && packed.size(1) == (K + 1) / 2
                         : packed.dim() == 3 && packed.size(1) == K) &&
                  bias.scalar_type() == at::kFloat && bias.numel() == N && bias.is_contiguous(),
              op, ": x, packing or bias do not match");
  if (pairs) check_dot(isa, op);
  auto y = at::empty({T, N}, x.options().dtype(at::kFloat));
#if PADFREE_X86
  float* out = y.data_ptr<float>();
  if (pairs) {
    static constexpr auto table = pairs_table(std::make_index_sequence<kRows>());
    auto xb = x.scalar_type() == at::kBFloat16 ? x : round_bf16(x, Act{});  // Act{}: none, the rounding alone
    if (K % 2) xb = at::constant_pad_nd(xb, {0, 1});  // the last pair's second k is zero in both
    blocks_product(table, reinterpret_cast<const uint32_t*>(xb.data_ptr<at::BFloat16>()), T, (K + 1) / 2,
                   reinterpret_cast<const uint32_t*>(packed.data_ptr<at::BFloat16>()), packed.size(0),
                   bias.data_ptr<float>(), out, N);
  } else if (packed.scalar_type() == at::kBFloat16) {
    static constexpr auto table = block_table<at::BFloat16>(std::make_index_sequence<kRows>());
    if (isa == Isa::avx2)
      avx2::blocks_product(x.data_ptr<float>(), T, K, packed.data_ptr<at::BFloat16>(), packed.size(0),
                           bias.data_ptr<float>(), out, N);
    else
      blocks_product(table, x.data_ptr<float>(), T, K, packed.data_ptr<at::BFloat16>(), packed.size(0),
                     bias.data_ptr<float>(), out, N);
  } else {
    static constexpr auto table = block_table<float>(std::make_index_sequence<kRows>());
    if (isa == Isa::avx2)
      avx2::blocks_product(x.data_ptr<float>(), T, K, packed.data_ptr<float>(), packed.size(0),
                           bias.data_ptr<float>(), out, N);
    else
      blocks_product(table, x.data_ptr<float>(), T, K, packed.data_ptr<float>(), packed.size(0),
                     bias.data_ptr<float>(), out, N);
  }
#endif
  return y;
}

// blocks_linear: multiply_packed for Python, the packing told by its rank (pack_pairs' are 4-D, pack_blocks' 3-D)
Tensor blocks_linear(const Tensor& x, const Tensor& packed, int64_t N, const Tensor& bias, const std::string& isa) {
  return multiply_packed(x, packed, N, bias, packed.dim() == 4, parse_isa(isa, "blocks_linear"), "blocks_linear");
}

// ---- int8 products (the AVX2 kernels, which AVX-512 CPUs run too) ----

std::string describe(const Tensor& t);

// The int8 products' ISA: "avx2" on any CPU with AVX2 and FMA; an error naming the op otherwise
void check_int8_isa(const std::string& isa, const char* op) {
  TORCH_CHECK(isa == "avx2", op, ": int8 products have AVX2 kernels only (isa 'avx2'), got isa '", isa, "'");
  const std::string why = lacks(isa);
  TORCH_CHECK(why.empty(), op, ": isa 'avx2' cannot run here: ", why);
}

// The activations' quantization levels (x in [-levels, levels]) that keep a product's int32 sums exact: an int16
// value (vpmaddwd's operands) with |sum| <= K * 127 * levels < 2^31
void check_levels(int64_t levels, int64_t K, const char* op) {
  TORCH_CHECK(levels >= 1 && levels <= 32767 && K * 127 * levels < (int64_t(1) << 31), op, ": levels ", levels,
              " must be in [1, 32767] with K * 127 * levels < 2^31 (K = ", K, ")");
}

// The activations' levels int8_linear takes by default: 12 bits (the AVX2 kernels multiply int16 values, so more
// bits than 8 cost nothing, and took the error to the int8 weights' alone: benchmarks/NOTES.md, section 26), fewer
// where K is so large that 12 bits could overflow the int32 sums
int64_t default_levels(int64_t K) {
  return std::min<int64_t>(2047, ((int64_t(1) << 31) - 1) / (127 * std::max<int64_t>(K, 1)));
}

// weight [N, K] (fp32 or bf16) -> (packed int8 [ceil(N / 16), ceil(K / 2), 16, 2], scales fp32 [N]): each column
// (output feature) quantized symmetrically, scale = max|w| / 127 (1 for an all-zero column), values round(w / scale)
// in [-127, 127]; columns and an odd K's last pair padded with zeros.
std::tuple<Tensor, Tensor> pack_int8(const Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "pack_int8: an fp32 or bf16 [N, K] weight");
  const Tensor w = weight.to(at::kFloat);
  const int64_t N = w.size(0), K = w.size(1), panels = (N + kQCols - 1) / kQCols, pairs = (K + 1) / 2;
  const Tensor amax = w.abs().amax(1);
  const Tensor scales = at::where(amax > 0, amax / 127.f, at::ones_like(amax)).contiguous();
  const Tensor q = at::round(w / scales.unsqueeze(1)).clamp_(-127, 127).to(at::kChar);
  auto padded = at::zeros({panels * kQCols, 2 * pairs}, q.options());
  padded.slice(0, 0, N).slice(1, 0, K).copy_(q);
  return {padded.view({panels, kQCols, pairs, 2}).permute({0, 2, 1, 3}).contiguous(), scales};
}

// x [M, K] fp32 -> (xq int16 [M, K rounded up to even], scales fp32 [M]): each row quantized symmetrically to
// [-levels, levels], scale = max|x| / levels (1 for an all-zero row), xq = round(x * (levels / max|x|)), half to even
std::tuple<Tensor, Tensor> quantize_rows(const Tensor& x, int64_t levels, const std::string& isa) {
  check_int8_isa(isa, "quantize_rows");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "quantize_rows: a contiguous fp32 [M, K] tensor");
  check_levels(levels, x.size(1), "quantize_rows");
  const int64_t M = x.size(0), K = x.size(1), padded = K + K % 2;
  auto q = at::empty({M, padded}, x.options().dtype(at::kShort));
  auto s = at::empty({M}, x.options());
#if PADFREE_X86
  const float* xp = x.data_ptr<float>();
  int16_t* qp = q.data_ptr<int16_t>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, kNormGrain / std::max<int64_t>(K, 1)), [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m)
      sp[m] = avx2::quantize_row(xp + m * K, K, qp + m * padded, padded, float(levels));
  });
#endif
  return {q, s};
}

// act(x @ W^T + bias) + residual with x [M, K] fp32 quantized per row here (quantize_rows to `levels`, None:
// default_levels), W packed by pack_int8 (packed, scales; N columns): exact int32 sums, dequantized in fp32. bias [N]
// and residual [M, N] fp32 or None; activation: none, gelu, gelu_tanh, relu or silu. -> [M, N] fp32
Tensor int8_linear(const Tensor& x, const Tensor& packed, const Tensor& scales, int64_t N,
                   const std::optional<Tensor>& bias, const std::string& activation,
                   const std::optional<Tensor>& residual, std::optional<int64_t> levels, const std::string& isa) {
  check_int8_isa(isa, "int8_linear");
  const Act act = activation == "none" ? Act::none : parse_activation(activation);
  const int64_t M = x.size(0), K = x.dim() == 2 ? x.size(1) : -1, pairs = (K + 1) / 2;
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
                  packed.size(1) == pairs && packed.size(2) == kQCols && packed.size(0) * kQCols >= N &&
                  scales.scalar_type() == at::kFloat && scales.numel() == N && scales.is_contiguous(),
              "int8_linear: x [M, K] and pack_int8's packing and scales of a [N, K] weight; got x ", describe(x),
              ", packing ", describe(packed), ", scales ", describe(scales), ", N ", N);
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous()),
              "int8_linear: bias must be a contiguous fp32 [N] tensor");
  TORCH_CHECK(!residual || (residual->scalar_type() == at::kFloat && residual->dim() == 2 && residual->size(0) == M &&
                            residual->size(1) == N && residual->is_contiguous()),
              "int8_linear: residual must be a contiguous fp32 [M, N] tensor");
  const auto [xq, xs] = quantize_rows(x.to(at::kFloat).contiguous(), levels ? *levels : default_levels(K), isa);
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
#if PADFREE_X86
  avx2::qproduct(xq.data_ptr<int16_t>(), xs.data_ptr<float>(), M, pairs, packed.data_ptr<int8_t>(),
                 scales.data_ptr<float>(), packed.size(0), bias ? bias->data_ptr<float>() : nullptr,
                 residual ? residual->data_ptr<float>() : nullptr, y.data_ptr<float>(), N, act);
#endif
  return y;
}

// The FFN activation in place on a contiguous fp32 tensor, split over the threads (isa aten: ATen's own)
void activate_(Tensor& f, const std::string& activation, const std::string& isa_name) {
  const Act act = parse_activation(activation);
  const Isa isa = parse_isa(isa_name, "activate_");
  TORCH_CHECK(f.scalar_type() == at::kFloat && f.is_contiguous(), "activate_: a contiguous fp32 tensor");
  if (isa == Isa::aten) {
    if (act == Act::gelu) at::gelu_(f);
    else if (act == Act::gelu_tanh) at::gelu_(f, "tanh");
    else if (act == Act::relu) at::relu_(f);
    else at::silu_(f);
    return;
  }
#if PADFREE_X86
  float* p = f.data_ptr<float>();
  using Span = void (*)(float*, int64_t);
  const Span span = isa == Isa::avx2 ? (act == Act::gelu        ? avx2::act_span<Act::gelu>
                                        : act == Act::gelu_tanh ? avx2::act_span<Act::gelu_tanh>
                                        : act == Act::relu      ? avx2::act_span<Act::relu>
                                                                : avx2::act_span<Act::silu>)
                                     : (act == Act::gelu        ? act_span<Act::gelu>
                                        : act == Act::gelu_tanh ? act_span<Act::gelu_tanh>
                                        : act == Act::relu      ? act_span<Act::relu>
                                                                : act_span<Act::silu>);
  at::parallel_for(0, f.numel(), 4096, [&](int64_t first, int64_t last) { span(p + first, last - first); });
#endif
}

// One row's residual add and LayerNorm (norm_row) on the ISA's vectors
using NormRow = void (*)(float*, const float*, const float*, const float*, int64_t, float);

#if PADFREE_X86
NormRow norm_row_of(Isa isa) { return isa == Isa::avx2 ? avx2::norm_row : norm_row; }
#endif

// y = LayerNorm(y + x) over the last dimension, in place (y, x: contiguous fp32 [T, H]; gamma, beta: fp32 [H])
void add_layer_norm_(Tensor& y, const Tensor& x, const Tensor& gamma, const Tensor& beta, double eps,
                     const std::string& isa_name) {
  const Isa isa = parse_isa(isa_name, "add_layer_norm_");
  const int64_t H = y.size(-1), T = y.numel() / std::max<int64_t>(H, 1);
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && y.is_contiguous() &&
                  x.is_contiguous() && x.sizes() == y.sizes() && gamma.scalar_type() == at::kFloat &&
                  beta.scalar_type() == at::kFloat && gamma.numel() == H && beta.numel() == H &&
                  gamma.is_contiguous() && beta.is_contiguous(),
              "add_layer_norm_: fp32 contiguous y and x of one shape, fp32 contiguous gamma and beta of its last size");
  if (isa == Isa::aten) {
    y.copy_(at::layer_norm(y.add_(x), {H}, gamma, beta, eps));
    return;
  }
#if PADFREE_X86
  const NormRow row = norm_row_of(isa);
  float* out = y.data_ptr<float>();
  const float *res = x.data_ptr<float>(), *g = gamma.data_ptr<float>(), *b = beta.data_ptr<float>();
  at::parallel_for(0, T, std::max<int64_t>(1, kNormGrain / std::max<int64_t>(H, 1)), [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) row(out + t * H, res + t * H, g, b, H, float(eps));
  });
#else
  (void)T;
#endif
}

#if PADFREE_X86
template <typename E>
void embed_tokens(Isa isa, const int64_t* ids, const int64_t* pos, const int64_t* types, const Tensor& word,
                  const std::optional<Tensor>& position, const std::optional<Tensor>& token_type, const float* gamma,
                  const float* beta, float eps, float* out, int64_t T, int64_t D) {
  const E* w = word.data_ptr<E>();
  const E* p = position ? position->data_ptr<E>() : nullptr;
  const E* y = token_type ? token_type->data_ptr<E>() : nullptr;
  using Rows = void (*)(const std::array<const E*, 3>&, float*, int64_t);
  const Rows rows = isa == Isa::avx2 ? avx2::embed_rows<E> : embed_rows<E>;
  const NormRow norm = norm_row_of(isa);
  at::parallel_for(0, T, std::max<int64_t>(1, kNormGrain / std::max<int64_t>(D, 1)), [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      rows({w + ids[t] * D, p ? p + pos[t] * D : nullptr, y ? y + types[t] * D : nullptr}, out + t * D, D);
      norm(out + t * D, nullptr, gamma, beta, D, eps);
    }
  });
}
#endif

// LayerNorm(word[ids] + position[positions] + token_type[types]) -> [T, D] in the tables' dtype (fp32 or bf16,
// computed in fp32); the position and token-type tables optional (their indices needed where they are given), gamma
// and beta fp32 (beta optional). avx512 or avx2 (with ATen the caller runs the lookups, adds and layer_norm itself).
Tensor embed_layer_norm(const Tensor& ids, const std::optional<Tensor>& positions, const std::optional<Tensor>& types,
                        const Tensor& word, const std::optional<Tensor>& position,
                        const std::optional<Tensor>& token_type, const Tensor& gamma,
                        const std::optional<Tensor>& beta, double eps, const std::string& isa_name) {
  const Isa isa = parse_isa(isa_name, "embed_layer_norm");
  TORCH_CHECK(isa != Isa::aten, "embed_layer_norm: needs isa 'avx2' or 'avx512' (with ATen the caller runs the "
              "embedding lookups and layer_norm itself), got 'aten'");
  const int64_t T = ids.numel(), D = word.size(1);
  const auto dtype = word.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && word.dim() == 2 && word.is_contiguous(),
              "embed_layer_norm: the word table must be a contiguous fp32 or bf16 [V, D] tensor");
  for (const auto* table : {&position, &token_type})
    TORCH_CHECK(!*table || ((*table)->scalar_type() == dtype && (*table)->dim() == 2 && (*table)->size(1) == D &&
                            (*table)->is_contiguous()),
                "embed_layer_norm: the position and token-type tables must be contiguous [n, D] like the word table");
  TORCH_CHECK(gamma.scalar_type() == at::kFloat && gamma.numel() == D && gamma.is_contiguous() &&
                  (!beta || (beta->scalar_type() == at::kFloat && beta->numel() == D && beta->is_contiguous())),
              "embed_layer_norm: fp32 contiguous gamma and beta of the tables' row size");
  const int64_t* id = table_index(ids, word, T, "token id");
  TORCH_CHECK((!position || positions) && (!token_type || types), "embed_layer_norm: a table without its indices");
  const int64_t* pos = position ? table_index(*positions, *position, T, "position") : nullptr;
  const int64_t* type = token_type ? table_index(*types, *token_type, T, "token type") : nullptr;
  auto out = at::empty({T, D}, word.options().dtype(at::kFloat));
#if PADFREE_X86
  const float* b = beta ? beta->data_ptr<float>() : nullptr;
  if (dtype == at::kFloat)
    embed_tokens<float>(isa, id, pos, type, word, position, token_type, gamma.data_ptr<float>(), b, float(eps),
                        out.data_ptr<float>(), T, D);
  else
    embed_tokens<at::BFloat16>(isa, id, pos, type, word, position, token_type, gamma.data_ptr<float>(), b,
                               float(eps), out.data_ptr<float>(), T, D);
#else
  (void)id, (void)pos, (void)type;
#endif
  return out.to(dtype);
}

// Self-attention of each run (first token, sequences, length) of x's packed sequences: [T, 3H] -> [T, H]. With isa
// avx512 or avx2 and sequences of at most max_len tokens (at most kMaxLen; the caller's choice per CPU, where the
// native kernel is the faster: NOTES.md, sections 18, 19 and 22), attend() per (sequence, head), split
// over the threads (dot: on bf16 dot products, avx512 with AVX-512 BF16); otherwise (isa aten, longer sequences)
// PyTorch's CPU flash kernel on strided views, per run, in fp32.
Tensor attention(const Tensor& qkv, const std::vector<int64_t>& runs, int64_t heads, double scale, int64_t max_len,
                 bool dot, const std::string& isa_name) {
  const Isa isa = parse_isa(isa_name, "attention");
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat && qkv.size(1) % (3 * heads) == 0,
              "attention: qkv must be an fp32 [T, 3H] tensor, H a multiple of heads");
  if (dot) check_dot(isa, "attention");
  const int64_t T = qkv.size(0), H = qkv.size(1) / 3, d = H / heads;
  int64_t longest = 0;
  std::vector<std::pair<int64_t, int64_t>> seqs;  // (first token, length)
  for (size_t r = 0; r + 2 < runs.size(); r += 3) {
    for (int64_t i = 0; i < runs[r + 1]; ++i) seqs.emplace_back(runs[r] + i * runs[r + 2], runs[r + 2]);
    longest = std::max(longest, runs[r + 2]);
  }
#if PADFREE_X86
  if (isa != Isa::aten && longest <= std::min(max_len, kMaxLen) && qkv.is_contiguous()) {
    using Attend = void (*)(const float*, const float*, const float*, int64_t, float*, int64_t, int64_t, int64_t,
                            float, Scratch&);
    const Attend attend_one = isa == Isa::avx2 ? avx2::attend : dot ? attend_dot : attend;
    auto out = at::empty({T, H}, qkv.options());
    const float* src = qkv.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    const int64_t units = static_cast<int64_t>(seqs.size()) * heads;
    at::parallel_for(0, units, 1, [&](int64_t first, int64_t last) {
      Scratch scratch(d, dot);
      for (int64_t u = first; u < last; ++u) {
        const auto [t0, n] = seqs[u / heads];
        const int64_t h = u % heads;
        const float* q = src + t0 * 3 * H + h * d;
        attend_one(q, q + H, q + 2 * H, 3 * H, dst + t0 * H + h * d, H, n, d, static_cast<float>(scale), scratch);
      }
    });
    return out;
  }
#endif
  const auto x = qkv.view({T, 3, heads, d});
  auto out = at::empty({T, heads, d}, qkv.options());
  for (size_t r = 0; r + 2 < runs.size(); r += 3) {
    const int64_t start = runs[r], count = runs[r + 1], n = runs[r + 2], end = start + count * n;
    const auto qkv_ = x.slice(0, start, end).view({count, n, 3, heads, d}).permute({2, 0, 3, 1, 4}).unbind(0);
    out.slice(0, start, end)
        .view({count, n, heads, d})
        .copy_(at::scaled_dot_product_attention(qkv_[0], qkv_[1], qkv_[2], {}, 0.0, false, scale).transpose(1, 2));
  }
  return out.view({T, H});
}

// ---- the stack's layers: every tensor named, the products' packing stated ----

// The packing of a layer's weights, which says the products its linears run on: blocks (pack_blocks': fp32 products,
// the weights fp32 or bf16 widened in registers; isa avx512 or avx2), pairs (pack_pairs': a bf16 model's products in
// bf16 dot products on x rounded to bf16, its attention on bf16 dot products too; isa avx512 with AVX-512 BF16),
// onednn or mkl (those libraries' packings of fp32 weights, torch.ops.mkldnn._reorder_linear_weight and
// torch.ops.mkl._mkl_reorder_linear_weight; any isa).
enum class Packing { blocks, pairs, onednn, mkl, int8 };

Packing parse_packing(const std::string& name) {
  if (name == "blocks") return Packing::blocks;
  if (name == "pairs") return Packing::pairs;
  if (name == "onednn") return Packing::onednn;
  if (name == "int8") return Packing::int8;
  TORCH_CHECK(name == "mkl", "StackLayer: unknown packing '", name, "' (blocks, pairs, onednn, mkl or int8)");
  return Packing::mkl;
}

const char* packing_name(Packing packing) {
  switch (packing) {
    case Packing::blocks: return "blocks";
    case Packing::pairs: return "pairs";
    case Packing::onednn: return "onednn";
    case Packing::mkl: return "mkl";
    case Packing::int8: return "int8";
  }
  return "?";
}

// One linear of a layer: weight [N, K] (fp32, or bf16 in a bf16 model), packed (the weight in the layer's packing),
// bias (fp32 [N]); scales (fp32 [N]): the int8 packing's per-column scales (pack_int8), undefined for the others
struct Linear {
  Tensor weight, packed, bias, scales;
};

// One LayerNorm of a layer: weight and bias, fp32 [H]
struct Norm {
  Tensor weight, bias;
};

// One post-LN layer of the stack (H: hidden size, F: FFN size), built once per layer and packing by its caller
// (make_stack_layer checks each field) and read by name here.
struct StackLayer {
  Packing packing;
  Linear qkv;       // [3H, H]
  Linear attn_out;  // [H, H]
  Norm attn_norm;   // [H]
  Linear ffn_in;    // [F, H]
  Linear ffn_out;   // [H, F]
  Norm ffn_norm;    // [H]
};

// A tensor's shape and dtype, for errors: "[96, 32] Float"
std::string describe(const Tensor& t) {
  std::ostringstream out;
  out << t.sizes() << " " << t.scalar_type();
  return out.str();
}

// A fp32 contiguous vector [n], else an error naming the field
void check_vector(const Tensor& v, const std::string& field, int64_t n) {
  TORCH_CHECK(v.defined() && v.dim() == 1 && v.size(0) == n && v.scalar_type() == at::kFloat && v.is_contiguous(),
              "StackLayer: ", field, " must be a contiguous fp32 [", n, "] tensor, got ",
              v.defined() ? describe(v) : "none");
}

// A linear's weight [N, K], its packing and its bias, else an error naming the field (name: "qkv" for qkv_weight,
// qkv_packed, qkv_bias)
void check_linear(const Linear& l, const std::string& name, Packing packing, int64_t N, int64_t K) {
  const auto dtype = l.weight.scalar_type();
  const bool fp32_only = packing == Packing::onednn || packing == Packing::mkl;
  TORCH_CHECK(l.weight.dim() == 2 && l.weight.size(0) == N && l.weight.size(1) == K &&
                  (dtype == at::kFloat || (dtype == at::kBFloat16 && !fp32_only)) &&
                  (dtype == at::kBFloat16 || packing != Packing::pairs),
              "StackLayer: ", name, "_weight must be a [", N, ", ", K, "] ",
              packing == Packing::pairs ? "bf16" : fp32_only ? "fp32" : "fp32 or bf16", " tensor for packing '",
              packing_name(packing), "', got ", describe(l.weight));
  const int64_t blocks = (N + kCols - 1) / kCols;
  const auto& p = l.packed;
  bool fits = false;
  std::ostringstream expected;
  if (packing == Packing::blocks) {
    fits = p.dim() == 3 && p.size(0) == blocks && p.size(1) == K && p.size(2) == kCols;
    expected << "pack_blocks' [" << blocks << ", " << K << ", " << kCols << "]";
  } else if (packing == Packing::pairs) {
    fits = p.dim() == 4 && p.size(0) == blocks && p.size(1) == (K + 1) / 2 && p.size(2) == kCols && p.size(3) == 2;
    expected << "pack_pairs' [" << blocks << ", " << (K + 1) / 2 << ", " << kCols << ", 2]";
  } else if (packing == Packing::int8) {
    const int64_t panels = (N + kQCols - 1) / kQCols;
    fits = p.dim() == 4 && p.size(0) == panels && p.size(1) == (K + 1) / 2 && p.size(2) == kQCols && p.size(3) == 2;
    expected << "pack_int8's [" << panels << ", " << (K + 1) / 2 << ", " << kQCols << ", 2]";
  } else {
    fits = p.is_mkldnn() && p.dim() == 2 && (packing == Packing::mkl || (p.size(0) == N && p.size(1) == K));
    expected << (packing == Packing::onednn ? "oneDNN's packing [" : "MKL's packing [") << N << ", " << K << "]";
  }
  const auto packed_dtype = packing == Packing::int8 ? at::kChar : dtype;
  TORCH_CHECK(fits && p.scalar_type() == packed_dtype && (p.is_mkldnn() || p.is_contiguous()), "StackLayer: ", name,
              "_packed must be ", expected.str(), " of ", name, "_weight (", packed_dtype, ") for packing '",
              packing_name(packing), "', got ", describe(p));
  check_vector(l.bias, name + "_bias", N);
  if (packing == Packing::int8) check_vector(l.scales, name + "_scales", N);
}

// A StackLayer from its fields, each checked against the packing and the hidden size (qkv_weight's K) and FFN size
// (ffn_in_weight's N); a field of the wrong shape or dtype is an error naming it.
StackLayer make_stack_layer(const std::string& packing, Tensor qkv_weight, Tensor qkv_packed, Tensor qkv_bias,
                            Tensor attn_out_weight, Tensor attn_out_packed, Tensor attn_out_bias,
                            Tensor attn_norm_weight, Tensor attn_norm_bias, Tensor ffn_in_weight,
                            Tensor ffn_in_packed, Tensor ffn_in_bias, Tensor ffn_out_weight, Tensor ffn_out_packed,
                            Tensor ffn_out_bias, Tensor ffn_norm_weight, Tensor ffn_norm_bias,
                            const std::optional<Tensor>& qkv_scales, const std::optional<Tensor>& attn_out_scales,
                            const std::optional<Tensor>& ffn_in_scales, const std::optional<Tensor>& ffn_out_scales) {
  const auto defined = [](const std::optional<Tensor>& t) { return t ? *t : Tensor(); };
  StackLayer layer{parse_packing(packing),
                   {qkv_weight, qkv_packed, qkv_bias, defined(qkv_scales)},
                   {attn_out_weight, attn_out_packed, attn_out_bias, defined(attn_out_scales)},
                   {attn_norm_weight, attn_norm_bias},
                   {ffn_in_weight, ffn_in_packed, ffn_in_bias, defined(ffn_in_scales)},
                   {ffn_out_weight, ffn_out_packed, ffn_out_bias, defined(ffn_out_scales)},
                   {ffn_norm_weight, ffn_norm_bias}};
  TORCH_CHECK(qkv_weight.dim() == 2, "StackLayer: qkv_weight must be a [3H, H] tensor (H: the hidden size), got ",
              describe(qkv_weight));
  TORCH_CHECK(ffn_in_weight.dim() == 2, "StackLayer: ffn_in_weight must be an [F, H] tensor (F: the FFN size), got ",
              describe(ffn_in_weight));
  const int64_t H = qkv_weight.size(1), F = ffn_in_weight.size(0);
  check_linear(layer.qkv, "qkv", layer.packing, 3 * H, H);
  check_linear(layer.attn_out, "attn_out", layer.packing, H, H);
  check_vector(layer.attn_norm.weight, "attn_norm_weight", H);
  check_vector(layer.attn_norm.bias, "attn_norm_bias", H);
  check_linear(layer.ffn_in, "ffn_in", layer.packing, F, H);
  check_linear(layer.ffn_out, "ffn_out", layer.packing, H, F);
  check_vector(layer.ffn_norm.weight, "ffn_norm_weight", H);
  check_vector(layer.ffn_norm.bias, "ffn_norm_bias", H);
  return layer;
}

// x [T, K] @ W^T + bias of one of a layer's linears, on the layer's packing -> [T, N] fp32
Tensor multiply(const Tensor& x, const Linear& l, Packing packing, Isa isa) {
  switch (packing) {
    case Packing::blocks: return multiply_packed(x, l.packed, l.weight.size(0), l.bias, false, isa, "post_ln_layers");
    case Packing::pairs: return multiply_packed(x, l.packed, l.weight.size(0), l.bias, true, isa, "post_ln_layers");
    case Packing::onednn: return onednn_linear(x, l.packed, l.bias);
    case Packing::int8: return int8_linear(x, l.packed, l.scales, l.weight.size(0), l.bias, "none", {}, {}, "avx2");
    case Packing::mkl: break;
  }
  return mkl_linear(x, l.packed, l.weight, l.bias);
}

// That layer i takes x [T, H] on this isa: hidden size and packing, else an error naming the layer
void check_layer_call(const StackLayer* layer, size_t i, const Tensor& x, Isa isa) {
  TORCH_CHECK(layer != nullptr, "post_ln_layers: layer ", i, " is None, not a StackLayer");
  TORCH_CHECK(layer->qkv.weight.size(1) == x.size(1), "post_ln_layers: layer ", i, " takes [T, ",
              layer->qkv.weight.size(1), "], x is ", describe(x));
  if (layer->packing == Packing::blocks || layer->packing == Packing::pairs)
    TORCH_CHECK(isa != Isa::aten, "post_ln_layers: layer ", i, "'s packing '", packing_name(layer->packing),
                "' needs isa 'avx2' or 'avx512' (the module's own products), got 'aten'");
  if (layer->packing == Packing::pairs) check_dot(isa, "post_ln_layers");
  if (layer->packing == Packing::int8) check_int8_isa("avx2", "post_ln_layers");
}

// One post-LN layer: x [T, H] fp32 -> [T, H] fp32 (see post_ln_layers)
Tensor run_layer(const Tensor& x, const StackLayer& layer, const std::vector<int64_t>& runs, int64_t heads,
                 double scale, double eps, const std::string& activation, int64_t attention_len, Isa isa,
                 const std::string& isa_name) {
  const bool dot = layer.packing == Packing::pairs;  // bf16 dot products: the attention's too
  const Tensor ctx = attention(multiply(x, layer.qkv, layer.packing, isa), runs, heads, scale, attention_len, dot,
                               isa_name);
  Tensor h = multiply(ctx, layer.attn_out, layer.packing, isa);
  add_layer_norm_(h, x, layer.attn_norm.weight, layer.attn_norm.bias, eps, isa_name);
  Tensor f = multiply(h, layer.ffn_in, layer.packing, isa);
#if PADFREE_X86
  if (dot)  // the activation and the FFN-out product's rounding to bf16 in one pass
    f = round_bf16(f, parse_activation(activation));
  else
#endif
    activate_(f, activation, isa_name);
  Tensor y = multiply(f, layer.ffn_out, layer.packing, isa);
  add_layer_norm_(y, h, layer.ffn_norm.weight, layer.ffn_norm.bias, eps, isa_name);
  return y;
}

// x [T, H] (fp32) through the layers (StackLayers, in the order they run; each states its packing, hence its
// products, and is checked against x and isa before any runs). The biases and LayerNorm vectors are fp32 whatever the
// weights' dtype. runs: (first token, sequences, length) of each run, flattened. attention_len: the longest sequence
// the native attention takes (attention()). isa: the ISA of every kernel of the stack (aten: ATen's activation,
// add + layer_norm and attention, the products oneDNN's or MKL's).
Tensor post_ln_layers(Tensor x, const std::vector<const StackLayer*>& layers, const std::vector<int64_t>& runs,
                      int64_t heads, double scale, double eps, const std::string& activation, int64_t attention_len,
                      const std::string& isa_name) {
  const Isa isa = parse_isa(isa_name, "post_ln_layers");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "post_ln_layers: x must be a contiguous fp32 [T, H] tensor");
  TORCH_CHECK(runs.size() % 3 == 0, "post_ln_layers: runs must be (first, count, length) triples");
  for (size_t i = 0; i < layers.size(); ++i) check_layer_call(layers[i], i, x, isa);
  for (const StackLayer* layer : layers)
    x = run_layer(x, *layer, runs, heads, scale, eps, activation, attention_len, isa, isa_name);
  return x;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<StackLayer>(m, "StackLayer",
                         "One post-LN layer of post_ln_layers: its tensors by name and the packing of its weights "
                         "(blocks, pairs, onednn or mkl), each field checked once, here.")
      .def(py::init(&make_stack_layer), py::kw_only(), py::arg("packing"), py::arg("qkv_weight"),
           py::arg("qkv_packed"), py::arg("qkv_bias"), py::arg("attn_out_weight"), py::arg("attn_out_packed"),
           py::arg("attn_out_bias"), py::arg("attn_norm_weight"), py::arg("attn_norm_bias"), py::arg("ffn_in_weight"),
           py::arg("ffn_in_packed"), py::arg("ffn_in_bias"), py::arg("ffn_out_weight"), py::arg("ffn_out_packed"),
           py::arg("ffn_out_bias"), py::arg("ffn_norm_weight"), py::arg("ffn_norm_bias"),
           py::arg("qkv_scales") = py::none(), py::arg("attn_out_scales") = py::none(),
           py::arg("ffn_in_scales") = py::none(), py::arg("ffn_out_scales") = py::none())
      .def_property_readonly("packing", [](const StackLayer& layer) { return packing_name(layer.packing); });
  m.def("post_ln_layers", &post_ln_layers, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_runs", &cpu_runs);
  m.def("pin_workers", &pin_workers);
  m.def("attention", &attention, py::call_guard<py::gil_scoped_release>());
  m.def("activate_", &activate_, py::call_guard<py::gil_scoped_release>());
  m.def("add_layer_norm_", &add_layer_norm_, py::call_guard<py::gil_scoped_release>());
  m.def("embed_layer_norm", &embed_layer_norm, py::call_guard<py::gil_scoped_release>());
  m.def("pack_blocks", &pack_blocks);
  m.def("pack_pairs", &pack_pairs);
  m.def("blocks_linear", &blocks_linear, py::call_guard<py::gil_scoped_release>());
  m.def("pack_int8", &pack_int8);
  m.def("quantize_rows", &quantize_rows, py::call_guard<py::gil_scoped_release>());
  m.def("int8_linear", &int8_linear, py::call_guard<py::gil_scoped_release>());
}
