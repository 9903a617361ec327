import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Without a GPU, Triton kernels run in its CPU interpreter. Triton reads this when a kernel is defined, so it
# must be set before any test module imports a padfree.ops.triton_* module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
