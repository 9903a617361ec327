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


def _parse_the_stdlib_once():
    """padfree.bench.corpus.stdlib_paragraphs parses every module of the standard library (6-8 s on the CI's 2
    cores) at each call, and the tests call it about fifteen times. The paragraphs are the same at every call:
    parse once per ``min_chars`` in this process and pick ``limit`` of them as the function does (evenly spread
    over the whole list). A new list at each call, as before. Subprocesses still run the real function."""
    import functools

    from padfree.bench import corpus
    real = corpus.stdlib_paragraphs

    @functools.lru_cache(maxsize=None)
    def everything(min_chars: int) -> tuple[str, ...]:
        return tuple(real(limit=None, min_chars=min_chars))

    @functools.wraps(real)
    def stdlib_paragraphs(limit: int | None = None, min_chars: int = 20) -> list[str]:
        out = list(everything(min_chars))
        if limit is not None and len(out) > limit:  # the selection of corpus.stdlib_paragraphs
            step = len(out) / limit
            out = [out[int(i * step)] for i in range(limit)]
        return out
    corpus.stdlib_paragraphs = stdlib_paragraphs


_parse_the_stdlib_once()


@pytest.fixture
def triton_everywhere(monkeypatch):
    """The Triton backend allowed on this machine's device (on the CPU its kernels run in the interpreter)."""
    pytest.importorskip("triton")
    from padfree.ops import registry
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = [dataclasses.replace(b, devices=b.devices | {device}) if b.name == "triton" else b
                for b in registry.BACKENDS]
    monkeypatch.setattr(registry, "BACKENDS", backends)
