// padfree's native small-batch path: the whole post-LN layer stack of a short batch in one call.
//
// Per layer: the QKV product, attention per (sequence, head), the output product, residual add and LayerNorm, the
// FFN-in product and its activation in place, the FFN-out product, residual add and LayerNorm. At a handful of tokens
// each op costs microseconds, and Python between them cost as much again (benchmarks/NOTES.md, section 17); here
// there is none, and the GIL is released for the whole stack. The products, the attention of sequences of at most
// 128 tokens, the activation and the residual add fused with LayerNorm are this file's AVX-512 kernels, split over
// the threads; the products the caller hands over as oneDNN's or MKL's packings are those libraries' (fp32 batches
// above the native product's range), and where the CPU lacks AVX-512 everything is ATen's. The stack computes in
// fp32: a bf16 model's batch runs on its bf16 weights, widened in registers or in bf16 dot products (x rounded to
// bf16 for each product), and the caller rounds the result to bf16 once: faster than oneDNN's bf16 products at these
// sizes and more exact than a bf16 forward (NOTES.md, sections 18 and 19).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <immintrin.h>
#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
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
// worker on the CPU its caller needed: on the 2-core EPYC VM, after 20 ms of idle, 10-20 % of MiniLM's batch-1 calls
// took 12-16 ms instead of ~2 (benchmarks/NOTES.md, section 19). Once per calling thread and team size; returns
// whether it pinned now.
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

// The AVX-512 code below is compiled for AVX-512 F/BW whatever the build's flags, and runs only where the CPU has
// them (has_avx512); elsewhere the stack keeps ATen's ops.
#define PADFREE_AVX512 __attribute__((target("avx512f,avx512bw")))
#define PADFREE_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return ok;
}

bool has_avx512_bf16() {
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

// The lanes of a 16-lane vector that hold one of the `left` values still to go (all 16 when 16 or more are left)
inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// ---- the product of a short batch: y [T, N] = x [T, K] @ W^T + bias; x, y, bias fp32; W fp32 or bf16 ----
// At a few dozen rows a product is a pass over its weight, which comes from the last-level cache or memory (a model's
// weights do not fit the 2 MiB L2): the kernel streams the weight once per 12 rows in blocks of 32 columns packed
// contiguously, on Intel CPUs prefetching 4 KiB ahead of its loads, which the Xeon's hardware prefetcher alone does
// not keep fed (own_prefetch; Xeon: 1.2-2.3x MKL's packed sgemm at 8-48 rows; EPYC, where the hardware prefetcher
// suffices: faster than oneDNN's to 64 rows, as fast at 96; above those the caller hands fp32 batches MKL's or
// oneDNN's packings; benchmarks/NOTES.md sections 18 and 19). At 13-16 rows a block takes two calls of at most 8
// rows: the first streams it from memory, the second finds it in L2 and, so that memory does not idle while it
// computes, prefetches the thread's next block into L2 (BERT-base at 16 tokens 3-4 % faster on the EPYC; with more
// rows a call, its compute alone covers the next block's memory time: section 20). A bf16 weight is half the bytes,
// widened to fp32 in registers (block) or used in bf16 dot products (block_pairs).
constexpr int64_t kCols = 32;     // output columns per block: two 16-lane fp32 vectors
constexpr int kRows = 12;         // rows per kernel call: 24 accumulators, 2 weight vectors, 1 broadcast in registers
constexpr int kSplit = 11;        // rows per call where a block takes several: the 12-row kernel keeps 12 row
                                  // pointers and spills one per step, 4-8 % slower than 11 rows (section 21)
constexpr int64_t kAhead = 4096;  // prefetch distance in bytes

// Whether a call prefetches its own block kAhead ahead of its loads: on Intel's Xeon the hardware prefetcher alone
// did not keep the stream fed (BERT-base's weights at 8 rows: 26.4 ms without, 18.0 with; section 18); on AMD's Zen 4
// it does, and the software prefetch cost 3-5 % at 8 rows and 1-3 % at 32-64 (section 20)
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
// A product's kernels: [rows - 1] without prefetches, [kRows + rows - 1] with them. The loop of a kernel that
// checked for prefetches at each step (on AMD none but the next-block one) ran 5-7 % slower at 32-128 rows than one
// without the checks (NOTES.md, section 21).
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

// x [T, K] fp32 @ W^T + bias, W [N, K] packed by pack_blocks ([blocks, K, 32]: fp32 products) or pack_pairs
// ([blocks, K / 2, 32, 2]: x rounded to bf16, bf16 dot products); fp32 bias and result [T, N]
Tensor blocks_linear(const Tensor& x, const Tensor& packed, int64_t N, const Tensor& bias) {
  TORCH_CHECK(has_avx512(), "blocks_linear: needs AVX-512");
  const int64_t T = x.size(0), K = x.size(1), pairs = packed.dim() == 4;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && packed.size(0) * kCols >= N &&
                  (pairs ? packed.size(1) == (K + 1) / 2 : packed.dim() == 3 && packed.size(1) == K) &&
                  bias.scalar_type() == at::kFloat && bias.numel() == N && bias.is_contiguous(),
              "blocks_linear: x, packing or bias do not match");
  auto y = at::empty({T, N}, x.options());
  float* out = y.data_ptr<float>();
  if (pairs) {
    TORCH_CHECK(has_avx512_bf16(), "blocks_linear: a pack_pairs packing needs AVX-512 BF16");
    static constexpr auto table = pairs_table(std::make_index_sequence<kRows>());
    auto xb = x.to(at::kBFloat16);
    if (K % 2) xb = at::constant_pad_nd(xb, {0, 1});  // the last pair's second k is zero in both
    blocks_product(table, reinterpret_cast<const uint32_t*>(xb.data_ptr<at::BFloat16>()), T, (K + 1) / 2,
                   reinterpret_cast<const uint32_t*>(packed.data_ptr<at::BFloat16>()), packed.size(0),
                   bias.data_ptr<float>(), out, N);
  } else if (packed.scalar_type() == at::kBFloat16) {
    static constexpr auto table = block_table<at::BFloat16>(std::make_index_sequence<kRows>());
    blocks_product(table, x.data_ptr<float>(), T, K, packed.data_ptr<at::BFloat16>(), packed.size(0),
                   bias.data_ptr<float>(), out, N);
  } else {
    static constexpr auto table = block_table<float>(std::make_index_sequence<kRows>());
    blocks_product(table, x.data_ptr<float>(), T, K, packed.data_ptr<float>(), packed.size(0),
                   bias.data_ptr<float>(), out, N);
  }
  return y;
}

// x @ weight^T + bias on the layer's packing: pack_blocks' or pack_pairs' (with an fp32 bias), or else oneDNN's
// (onednn) or MKL's (both opaque tensors of oneDNN's layout, told apart by the caller)
Tensor linear(const Tensor& x, const Tensor& packed, const Tensor& weight, const Tensor& bias, bool onednn) {
  if (packed.dim() >= 3) return blocks_linear(x, packed, weight.size(0), bias);
  return onednn ? onednn_linear(x, packed, bias) : mkl_linear(x, packed, weight, bias);
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

enum class Act { gelu, gelu_tanh, relu, silu };

Act parse_activation(const std::string& activation) {
  if (activation == "gelu") return Act::gelu;
  if (activation == "gelu_tanh") return Act::gelu_tanh;
  if (activation == "relu") return Act::relu;
  TORCH_CHECK(activation == "silu", "post_ln_layers: unknown activation ", activation);
  return Act::silu;
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

// The FFN activation in place on a contiguous fp32 tensor, split over the threads (ATen's own below AVX-512).
void activate_(Tensor& f, const std::string& activation) {
  const Act act = parse_activation(activation);
  if (!has_avx512()) {
    if (act == Act::gelu) at::gelu_(f);
    else if (act == Act::gelu_tanh) at::gelu_(f, "tanh");
    else if (act == Act::relu) at::relu_(f);
    else at::silu_(f);
    return;
  }
  float* p = f.data_ptr<float>();
  const auto span = act == Act::gelu        ? act_span<Act::gelu>
                    : act == Act::gelu_tanh ? act_span<Act::gelu_tanh>
                    : act == Act::relu      ? act_span<Act::relu>
                                            : act_span<Act::silu>;
  at::parallel_for(0, f.numel(), 4096, [&](int64_t first, int64_t last) { span(p + first, last - first); });
}

// ---- residual add and LayerNorm, fused: y = LayerNorm(y + x) in place ----
// One row at a time: the sum (stored) and its mean, the variance about the mean (two passes, as exact as ATen's), the
// normalised row; three passes over a row that stays in L1. Rows split over the threads only where there are enough
// of them (an ATen add and layer_norm each cost ~5 us of dispatch at a handful of rows; section 20).
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

// Rows of at most this many floats per thread: fewer run on the calling thread alone
constexpr int64_t kNormGrain = 32768;

// y = LayerNorm(y + x) over the last dimension, in place (y, x: contiguous fp32 [T, H]; gamma, beta: fp32 [H])
void add_layer_norm_(Tensor& y, const Tensor& x, const Tensor& gamma, const Tensor& beta, double eps) {
  const int64_t H = y.size(-1), T = y.numel() / std::max<int64_t>(H, 1);
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && y.is_contiguous() &&
                  x.is_contiguous() && x.sizes() == y.sizes() && gamma.scalar_type() == at::kFloat &&
                  beta.scalar_type() == at::kFloat && gamma.numel() == H && beta.numel() == H &&
                  gamma.is_contiguous() && beta.is_contiguous(),
              "add_layer_norm_: fp32 contiguous y and x of one shape, fp32 contiguous gamma and beta of its last size");
  if (!has_avx512()) {
    y.copy_(at::layer_norm(y.add_(x), {H}, gamma, beta, eps));
    return;
  }
  float* out = y.data_ptr<float>();
  const float *res = x.data_ptr<float>(), *g = gamma.data_ptr<float>(), *b = beta.data_ptr<float>();
  at::parallel_for(0, T, std::max<int64_t>(1, kNormGrain / std::max<int64_t>(H, 1)), [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) norm_row(out + t * H, res + t * H, g, b, H, float(eps));
  });
}

// ---- embeddings: LayerNorm(word[id] + position[pos] + token_type[type]), a token at a time ----
// The rows of the tables (fp32 or bf16) summed in fp32 and normalised in place: one pass where ATen's path took
// three lookups, two adds and a LayerNorm (~5 us of dispatch each at a handful of tokens; section 20).
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

// A table's row index of each token, checked: an index out of range is an error, never a read past the table
const int64_t* table_index(const Tensor& index, const Tensor& table, int64_t T, const char* name) {
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.numel() == T,
              "embed_layer_norm: ", name, " must be a contiguous int64 tensor of one index a token");
  const int64_t *p = index.data_ptr<int64_t>(), rows = table.size(0);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(p[t] >= 0 && p[t] < rows, "embed_layer_norm: ", name, " ", p[t], " is outside [0, ", rows, ")");
  return p;
}

template <typename E>
void embed_tokens(const int64_t* ids, const int64_t* pos, const int64_t* types, const Tensor& word,
                  const std::optional<Tensor>& position, const std::optional<Tensor>& token_type, const float* gamma,
                  const float* beta, float eps, float* out, int64_t T, int64_t D) {
  const E* w = word.data_ptr<E>();
  const E* p = position ? position->data_ptr<E>() : nullptr;
  const E* y = token_type ? token_type->data_ptr<E>() : nullptr;
  at::parallel_for(0, T, std::max<int64_t>(1, kNormGrain / std::max<int64_t>(D, 1)), [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      embed_rows<E>({w + ids[t] * D, p ? p + pos[t] * D : nullptr, y ? y + types[t] * D : nullptr}, out + t * D, D);
      norm_row(out + t * D, nullptr, gamma, beta, D, eps);
    }
  });
}

// LayerNorm(word[ids] + position[positions] + token_type[types]) -> [T, D] in the tables' dtype (fp32 or bf16,
// computed in fp32); the position and token-type tables optional (their indices needed where they are given), gamma
// and beta fp32 (beta optional)
Tensor embed_layer_norm(const Tensor& ids, const std::optional<Tensor>& positions, const std::optional<Tensor>& types,
                        const Tensor& word, const std::optional<Tensor>& position,
                        const std::optional<Tensor>& token_type, const Tensor& gamma,
                        const std::optional<Tensor>& beta, double eps) {
  TORCH_CHECK(has_avx512(), "embed_layer_norm: needs AVX-512");
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
  const float* b = beta ? beta->data_ptr<float>() : nullptr;
  if (dtype == at::kFloat)
    embed_tokens<float>(id, pos, type, word, position, token_type, gamma.data_ptr<float>(), b, float(eps),
                        out.data_ptr<float>(), T, D);
  else
    embed_tokens<at::BFloat16>(id, pos, type, word, position, token_type, gamma.data_ptr<float>(), b, float(eps),
                               out.data_ptr<float>(), T, D);
  return out.to(dtype);
}

// ---- attention of short sequences ----
constexpr int64_t kMaxLen = 128;  // the longest sequence attend() takes (8 score vectors); PyTorch's kernel above
constexpr int64_t kGroup = 8;    // query rows attend_rows() takes at once: 8 independent accumulators per loop

// R consecutive query rows of one head (R <= kGroup): scores against the n keys, softmax, context. Each loop runs R
// independent accumulators and loads each key / value vector once for the R rows. kt: the keys transposed
// ([d][kMaxLen], so that a row's scores are 16-lane vectors over the keys); p: scratch of R x kMaxLen floats.
template <int R>
PADFREE_AVX512 void attend_rows(const float* q, const float* v, int64_t ld, float* out, int64_t ldo, int64_t n,
                                int64_t d, float scale, const float* kt, float* p) {
  const int64_t blocks = (n + 15) / 16;
  for (int64_t b = 0; b < blocks; ++b) {  // scores, 16 keys at a time
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; ++c) {
      const __m512 kc = _mm512_loadu_ps(kt + c * kMaxLen + 16 * b);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * ld + c]), kc, acc[r]);
    }
    for (int r = 0; r < R; ++r)
      _mm512_storeu_ps(p + r * kMaxLen + 16 * b, _mm512_mul_ps(acc[r], _mm512_set1_ps(scale)));
  }
  float inv[R];
  for (int r = 0; r < R; ++r) {  // softmax of each row, over the n real keys
    float* pr = p + r * kMaxLen;
    float top = -INFINITY, sum = 0.f;
    for (int64_t b = 0; b < blocks; ++b)
      top = std::max(top, _mm512_mask_reduce_max_ps(lanes(n - 16 * b), _mm512_loadu_ps(pr + 16 * b)));
    for (int64_t b = 0; b < blocks; ++b) {
      const __m512 shifted = _mm512_sub_ps(_mm512_loadu_ps(pr + 16 * b), _mm512_set1_ps(top));
      const __m512 e = _mm512_maskz_mov_ps(lanes(n - 16 * b), exp16(shifted));
      sum += _mm512_reduce_add_ps(e);
      _mm512_storeu_ps(pr + 16 * b, e);
    }
    inv[r] = 1.f / sum;
  }
  for (int64_t c0 = 0; c0 < d; c0 += 16) {  // context, 16 features at a time
    const __mmask16 m = lanes(d - c0);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m512 vj = _mm512_maskz_loadu_ps(m, v + j * ld + c0);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(p[r * kMaxLen + j]), vj, acc[r]);
    }
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(out + r * ldo + c0, m, _mm512_mul_ps(acc[r], _mm512_set1_ps(inv[r])));
  }
}

// softmax(q k^T scale) v for one head of one sequence of n <= kMaxLen tokens: q, k, v rows at a stride of ld
// floats (rows of [T, 3H]), d features; out rows at a stride of ldo. kt: scratch of d x kMaxLen floats; p: of
// kGroup x kMaxLen.
PADFREE_AVX512 void attend(const float* q, const float* k, const float* v, int64_t ld, float* out, int64_t ldo,
                           int64_t n, int64_t d, float scale, float* kt, float* p) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < d; ++c) kt[c * kMaxLen + j] = k[j * ld + c];
  using Rows = void (*)(const float*, const float*, int64_t, float*, int64_t, int64_t, int64_t, float, const float*,
                       float*);
  static constexpr Rows rows[kGroup] = {attend_rows<1>, attend_rows<2>, attend_rows<3>, attend_rows<4>,
                                        attend_rows<5>, attend_rows<6>, attend_rows<7>, attend_rows<8>};
  for (int64_t i = 0; i < n; i += kGroup)
    rows[std::min(kGroup, n - i) - 1](q + i * ld, v, ld, out + i * ldo, ldo, n, d, scale, kt, p);
}

// Self-attention of each run (first token, sequences, length) of x's packed sequences: [T, 3H] -> [T, H]. With
// AVX-512 and sequences of at most max_len tokens (at most kMaxLen; the caller's choice per CPU: PyTorch's kernel
// was as fast from 64 tokens on the Xeon, slower to 128 on the EPYC), attend() per (sequence, head), split over
// the threads; otherwise PyTorch's CPU flash kernel on strided views, per run.
Tensor attention(const Tensor& qkv, const std::vector<int64_t>& runs, int64_t heads, double scale, int64_t max_len) {
  const int64_t T = qkv.size(0), H = qkv.size(1) / 3, d = H / heads;
  int64_t longest = 0;
  std::vector<std::pair<int64_t, int64_t>> seqs;  // (first token, length)
  for (size_t r = 0; r + 2 < runs.size(); r += 3) {
    for (int64_t i = 0; i < runs[r + 1]; ++i) seqs.emplace_back(runs[r] + i * runs[r + 2], runs[r + 2]);
    longest = std::max(longest, runs[r + 2]);
  }
  if (has_avx512() && longest <= std::min(max_len, kMaxLen) && qkv.is_contiguous()) {
    auto out = at::empty({T, H}, qkv.options());
    const float* src = qkv.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    const int64_t units = static_cast<int64_t>(seqs.size()) * heads;
    at::parallel_for(0, units, 1, [&](int64_t first, int64_t last) {
      std::vector<float> kt(d * kMaxLen), p(kGroup * kMaxLen);
      for (int64_t u = first; u < last; ++u) {
        const auto [t0, n] = seqs[u / heads];
        const int64_t h = u % heads;
        const float* q = src + t0 * 3 * H + h * d;
        attend(q, q + H, q + 2 * H, 3 * H, dst + t0 * H + h * d, H, n, d, static_cast<float>(scale), kt.data(),
               p.data());
      }
    });
    return out;
  }
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

// x [T, H] (fp32) through the layers; per layer 16 tensors in this order: qkv weight, its packing, bias; attention
// output weight, packing, bias; LayerNorm weight, bias; FFN-in weight, packing, bias; FFN-out weight, packing,
// bias; LayerNorm weight, bias. A packing is pack_blocks' (fp32 or bf16 weight), pack_pairs' (bf16), oneDNN's or
// MKL's (fp32); the biases and LayerNorm vectors are fp32 either way. runs: (first token, sequences, length) of each
// run, flattened. attention_len: the longest sequence the native attention takes (attention()); onednn: the 2-D
// packings are oneDNN's, not MKL's.
Tensor post_ln_layers(Tensor x, const std::vector<Tensor>& tensors, const std::vector<int64_t>& runs,
                      int64_t heads, double scale, double eps, const std::string& activation, int64_t attention_len,
                      bool onednn) {
  TORCH_CHECK(tensors.size() % 16 == 0, "post_ln_layers: 16 tensors per layer, got ", tensors.size());
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "post_ln_layers: x must be a contiguous fp32 [T, H] tensor");
  TORCH_CHECK(runs.size() % 3 == 0, "post_ln_layers: runs must be (first, count, length) triples");
  for (size_t i = 0; i < tensors.size(); i += 16) {
    const Tensor* p = &tensors[i];
    const Tensor ctx = attention(linear(x, p[1], p[0], p[2], onednn), runs, heads, scale, attention_len);
    Tensor h = linear(ctx, p[4], p[3], p[5], onednn);
    add_layer_norm_(h, x, p[6], p[7], eps);
    Tensor f = linear(h, p[9], p[8], p[10], onednn);
    activate_(f, activation);
    x = linear(f, p[12], p[11], p[13], onednn);
    add_layer_norm_(x, h, p[14], p[15], eps);
  }
  return x;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("post_ln_layers", &post_ln_layers, py::call_guard<py::gil_scoped_release>());
  m.def("has_avx512", &has_avx512);
  m.def("pin_workers", &pin_workers);
  m.def("attention", &attention, py::call_guard<py::gil_scoped_release>());
  m.def("activate_", &activate_, py::call_guard<py::gil_scoped_release>());
  m.def("add_layer_norm_", &add_layer_norm_, py::call_guard<py::gil_scoped_release>());
  m.def("embed_layer_norm", &embed_layer_norm, py::call_guard<py::gil_scoped_release>());
  m.def("has_avx512_bf16", &has_avx512_bf16);
  m.def("pack_blocks", &pack_blocks);
  m.def("pack_pairs", &pack_pairs);
  m.def("blocks_linear", &blocks_linear, py::call_guard<py::gil_scoped_release>());
}
