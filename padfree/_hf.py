"""``transformers``, an optional dependency (the ``hf`` extra).

No inference path imports it: a model directory loads, tokenizes and runs on ``torch``, ``safetensors`` and
``tokenizers``. It is imported only to accept what only transformers makes (an in-memory model) and to convert a
directory whose tokenizer has only slow-tokenizer files; where it is missing, those raise an ``ImportError``
naming the extra.
"""
from __future__ import annotations

import importlib.util

INSTALL = "pip install 'padfree[hf]'"


def have_transformers() -> bool:
    """Whether ``transformers`` can be imported (found, not imported: importing it costs ~1 s)."""
    try:
        return importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a broken entry in sys.modules
        return False


def missing(what: str) -> ImportError:
    """The error for ``what`` (a phrase: "converting ... ") when transformers is not installed."""
    return ImportError(f"{what} needs transformers, which is not installed: {INSTALL}")


def require_transformers(what: str):
    """The ``transformers`` module; ``ImportError`` naming ``what`` needed it and the extra if it is missing."""
    try:
        import transformers
    except ImportError as e:
        raise missing(what) from e
    return transformers
