"""What ``padfree info`` and the server's ``/info`` say about this machine: the CPU profile, the plan of paths it
gives (with the reason for each), the path a batch of each size takes, and the native module's state. Above both
:mod:`padfree.cpu` (which decides) and :mod:`padfree.ops` (which follow the decisions)."""
from __future__ import annotations

import torch

from .cpu import CpuPlan
from .ops import native
from .ops.onednn_backend import stack_path


def report(plan: CpuPlan, this_machine: bool = True) -> dict:
    """The plan as ``padfree info`` and the server's ``/info`` show it: :meth:`CpuPlan.describe`, the dtype "auto"
    picks, the path a plain post-LN model's batch of N tokens takes per dtype, and (``this_machine``) the native
    module's state: where it is built and which of its instruction sets this CPU runs, or why it is unavailable."""
    out = plan.describe()
    out["dtype_auto"] = "bfloat16" if plan.bf16_compute else "float32"
    names = {"blocks": "native stack, own products", "pairs": "native stack, bf16 dot products",
             "mkl": "native stack, MKL's products", "onednn": "native stack, oneDNN's products",
             None: "layer by layer (oneDNN products, PyTorch attention)"}
    out["paths"] = {str(dtype).removeprefix("torch."): {n: names[stack_path(dtype, n, plan)]
                                                         for n in (1, 16, 64, 128, 256)}
                    for dtype in (torch.float32, torch.bfloat16)}
    out["paths"]["int8"] = dict.fromkeys((1, 16, 64, 128, 256), "native stack, int8 products" if plan.int8_isa else
                                         f"not available ({plan.reasons['int8_isa']})")
    if this_machine:
        if not plan.native_isa:
            out["native_module"] = f"not used ({plan.reasons['native_isa']})"
        elif (mod := native.module()) is None:
            out["native_module"] = f"unavailable: {native.why_not()}"
        else:
            runs = [isa for isa in ("avx512", "avx512_bf16", "avx2") if mod.cpu_runs(isa)]
            out["native_module"] = f"{native.build_dir()[1]} (this CPU runs its {', '.join(runs) or 'ATen'} code)"
    return out
