"""Compile every Triton kernel variant padfree launches for an H100 (sm_90), ahead of time, without a GPU.

The CPU interpreter (``TRITON_INTERPRET=1``) runs the kernels' Python but not Triton's compiler, so errors that
only the compiler sees (a non-constexpr global, a type the GPU path rejects, a tile that does not fit in shared
memory) would otherwise first show on a lent GPU. Here each public function runs on CPU tensors with its kernel
replaced by a recorder that compiles the exact launch (argument types, constexprs, warps, stages) to a cubin
with Triton's bundled ptxas, and checks the shared memory it needs.

Run as a script with ``TRITON_INTERPRET`` unset (tests/test_triton_compile.py does); prints one line per variant.
``--shard I/N`` compiles every N-th variant from the I-th, so that N processes share the work.
"""
from __future__ import annotations

import os
import sys
import time

import torch

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET: it compiles for the GPU"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from padfree.ops import triton_activation, triton_attention, triton_embedding, triton_layer_norm  # noqa: E402
from padfree.ops.activations import ACTIVATIONS  # noqa: E402
from padfree.ops.relative import RelativeScores  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.int64: "*i64"}


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` compiles instead of launching."""

    seen: set = set()  # variants met so far, over all kernels
    shard, shards = 0, 1

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return self.compile

    def compile(self, *args, num_warps=4, num_stages=3, **kwargs):
        values = dict(zip(self.fn.arg_names, args), **kwargs)
        signature, constexprs = {}, {}
        for i, (name, param) in enumerate(zip(self.fn.arg_names, self.fn.params)):
            v = values[name]
            if param.is_constexpr:
                signature[name] = "constexpr"
                constexprs[(i,)] = False if name == "INTERPRET" else v
            elif isinstance(v, torch.Tensor):
                signature[name] = _PTR[v.dtype]
            elif isinstance(v, float):
                signature[name] = "fp32"
            else:
                signature[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        key = (self.fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), num_warps, num_stages)
        if key in self.seen:
            return
        self.seen.add(key)
        if len(self.seen) % self.shards != self.shard:
            return
        t0 = time.perf_counter()
        k = triton.compile(ASTSource(self.fn, signature, constexprs), target=TARGET,
                           options=dict(num_warps=num_warps, num_stages=num_stages))
        shared = k.metadata.shared
        flags = {self.fn.arg_names[i[0]]: v for i, v in constexprs.items()}
        print(f"{self.fn.__name__} {flags} warps={num_warps} stages={num_stages}: cubin {len(k.asm['cubin'])} B, "
              f"shared {shared} B, {time.perf_counter() - t0:.1f} s", flush=True)
        if shared > SHARED_LIMIT:
            raise ValueError(f"{self.fn.__name__} {flags} needs {shared} B of shared memory > {SHARED_LIMIT}")


def patch(module, name):
    setattr(module, name, Recorder(getattr(module, name)))


DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def attention(dtype, max_len, head_dim, qkv_bias=True, rel=None, heads=4, rows=9, rotary=False, window=None):
    """Run the public attention on zero CPU tensors of one shape; ``rel``: None, "bias" or "disentangled";
    ``rotary``: with RoPE tables; ``window``: a sliding window."""
    H = heads * head_dim
    qkv = torch.zeros(2 * max_len, 3 * H, dtype=dtype)
    cu = torch.tensor([0, max_len, 2 * max_len], dtype=torch.int32)
    bias = torch.zeros(3 * H, dtype=dtype) if qkv_bias else None
    index = torch.zeros(2 * max_len - 1, dtype=torch.long)
    scores = {None: None,
              "bias": RelativeScores(index, bias=torch.zeros(heads, rows, dtype=dtype)),
              "disentangled": RelativeScores(index, pos_key=torch.zeros(heads, rows, head_dim, dtype=dtype),
                                             pos_query=torch.zeros(heads, rows, head_dim, dtype=dtype))}[rel]
    tables = (torch.zeros(2 * max_len, head_dim // 2), torch.zeros(2 * max_len, head_dim // 2)) if rotary else None
    triton_attention.varlen_attention(qkv, cu, max_len, heads, bias, rel=scores, rotary=tables, window=window)


def attention_variants():
    for max_len in (50, 300):  # the single-tile and the streaming configuration
        for head_dim in triton_attention.HEAD_DIMS:
            attention(torch.float16, max_len, head_dim)
        for dtype in DTYPES:
            attention(dtype, max_len, 64)
            attention(dtype, max_len, 64, rel="disentangled")
        attention(torch.float16, max_len, 64, rel="bias")
        # ModernBERT (rotary, windowed local layers, no QKV bias), NomicBERT and EuroBERT (rotary, with and
        # without a QKV bias): every dtype, and every head size in fp16
        for dtype in DTYPES:
            for qkv_bias in (True, False):
                attention(dtype, max_len, 64, qkv_bias, rotary=True)
                attention(dtype, max_len, 64, qkv_bias, rotary=True, window=16)
            attention(dtype, max_len, 64, window=16)
        for head_dim in triton_attention.HEAD_DIMS:
            attention(torch.float16, max_len, head_dim, rotary=True, window=16)
    attention(torch.float16, 300, 64, qkv_bias=False)


def row_variants():
    for dtype in DTYPES:
        for H in (384, 4096):  # few rows per program, one row per program
            x = torch.zeros(8, H, dtype=dtype)
            v = torch.zeros(H, dtype=dtype)
            for bias in (v, None):
                for ln_bias in (v, None):  # None: a LayerNorm without bias (ModernBERT)
                    triton_layer_norm.add_bias_residual_layer_norm(x, bias, x, v, ln_bias, 1e-12)
            triton_layer_norm.rms_norm(x, v, 1e-6)
            x2, v2 = torch.zeros(8, 2 * H, dtype=dtype), torch.zeros(2 * H, dtype=dtype)
            for act in (ACTIVATIONS if dtype == torch.float16 else ("gelu", "silu")):
                triton_activation.bias_act(x, v, act)
                for bias in (v2, None):
                    triton_activation.gated_act(x2, bias, act)
            ids = torch.zeros(8, dtype=torch.long)
            table = torch.zeros(16, H, dtype=dtype)
            for position, token_type in ((table, table), (None, None)):
                triton_embedding.embed_layer_norm(ids, ids, ids, table, position, token_type, v, v, 1e-12)
            triton_embedding.embed_layer_norm(ids, None, None, table, None, None, v, None, 1e-5)  # ModernBERT


def main(argv: list[str]) -> int:
    if argv[:1] == ["--shard"]:
        Recorder.shard, Recorder.shards = map(int, argv[1].split("/"))
    patch(triton_attention, "_varlen_attention_kernel")
    patch(triton_layer_norm, "_add_bias_residual_layer_norm_kernel")
    patch(triton_activation, "_bias_act_kernel")
    patch(triton_activation, "_gated_act_kernel")
    patch(triton_layer_norm, "_rms_norm_kernel")
    patch(triton_embedding, "_embed_layer_norm_kernel")
    t0 = time.perf_counter()
    attention_variants()
    row_variants()
    print(f"shard {Recorder.shard}/{Recorder.shards} of {len(Recorder.seen)} variants compiled for sm_90 in "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
