// padfree's native small-batch path: the whole post-LN layer stack of a short fp32 batch in one call.
//
// The same ATen calls as the Python forward of the CPU backend's small-batch path (padfree/ops/onednn_backend.py),
// in the same order, so the result is the same to the bit: per layer, the QKV product on MKL's packed sgemm (bias
// inside), attention per run of equal lengths on strided views (PyTorch's CPU flash kernel), the output product,
// residual add and LayerNorm, the FFN-in product and its activation in place, the FFN-out product, residual add
// and LayerNorm. At a handful of tokens each op costs microseconds and Python between them cost as much again
// (benchmarks/NOTES.md, section 17); here there is none, and the GIL is released for the whole stack.
#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
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

// Self-attention of each run (first token, sequences, length) of x's packed sequences: [T, 3H] -> [T, H].
Tensor attention(const Tensor& qkv, const std::vector<int64_t>& runs, int64_t heads, double scale) {
  const int64_t T = qkv.size(0), H = qkv.size(1) / 3, d = H / heads;
  const auto x = qkv.view({T, 3, heads, d});
  if (runs.size() == 3 && runs[0] == 0 && runs[1] * runs[2] == T) {  // one run: the kernel's output, viewed
    const auto qkv_ = x.view({runs[1], runs[2], 3, heads, d}).permute({2, 0, 3, 1, 4}).unbind(0);
    return at::scaled_dot_product_attention(qkv_[0], qkv_[1], qkv_[2], {}, 0.0, false, scale)
        .transpose(1, 2)
        .reshape({T, H});
  }
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

// The FFN activation in place: "gelu" (erf), "gelu_tanh", "relu" or "silu" (padfree's canonical names).
void activate_(Tensor& f, const std::string& activation) {
  if (activation == "gelu") {
    at::gelu_(f);
  } else if (activation == "gelu_tanh") {
    at::gelu_(f, "tanh");
  } else if (activation == "relu") {
    at::relu_(f);
  } else {
    TORCH_CHECK(activation == "silu", "post_ln_layers: unknown activation ", activation);
    at::silu_(f);
  }
}

// x [T, H] through the layers; per layer 16 tensors in this order: qkv weight, its MKL packing, bias; attention
// output weight, packing, bias; LayerNorm weight, bias; FFN-in weight, packing, bias; FFN-out weight, packing,
// bias; LayerNorm weight, bias. runs: (first token, sequences, length) of each run, flattened.
Tensor post_ln_layers(Tensor x, const std::vector<Tensor>& tensors, const std::vector<int64_t>& runs,
                      int64_t heads, double scale, double eps, const std::string& activation) {
  TORCH_CHECK(tensors.size() % 16 == 0, "post_ln_layers: 16 tensors per layer, got ", tensors.size());
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "post_ln_layers: x must be a contiguous fp32 [T, H] tensor");
  TORCH_CHECK(runs.size() % 3 == 0, "post_ln_layers: runs must be (first, count, length) triples");
  const int64_t H = x.size(1);
  for (size_t i = 0; i < tensors.size(); i += 16) {
    const Tensor* p = &tensors[i];
    const Tensor ctx = attention(mkl_linear(x, p[1], p[0], p[2]), runs, heads, scale);
    const Tensor h = at::layer_norm(mkl_linear(ctx, p[4], p[3], p[5]).add_(x), {H}, p[6], p[7], eps);
    Tensor f = mkl_linear(h, p[9], p[8], p[10]);
    activate_(f, activation);
    x = at::layer_norm(mkl_linear(f, p[12], p[11], p[13]).add_(h), {H}, p[14], p[15], eps);
  }
  return x;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("post_ln_layers", &post_ln_layers, py::call_guard<py::gil_scoped_release>());
}
