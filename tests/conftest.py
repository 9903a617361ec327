import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run in its CPU interpreter. Triton reads this when a kernel is defined, so it
# must be set before any test module imports a padfree.ops.triton_* module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_everywhere(monkeypatch):
    """The Triton backend allowed on this machine's device (on the CPU its kernels run in the interpreter)."""
    pytest.importorskip("triton")
    from padfree.ops import registry
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = [dataclasses.replace(b, devices=b.devices | {device}) if b.name == "triton" else b
                for b in registry.BACKENDS]
    monkeypatch.setattr(registry, "BACKENDS", backends)
