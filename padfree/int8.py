"""int8 models: the accuracy gate a model loaded with ``dtype="int8"`` passes before it serves.

Every product op of such a model runs on int8 weights and activations (:mod:`padfree.ops.int8_backend`). How much
that moves a model's output depends on its weights (outlier channels, its depth), so :func:`check_accuracy` measures
it on each model at load: a fixed probe batch (:func:`probe_batch`) through the int8 and the float products of the
same encoder, its hidden states mean-pooled per sequence and compared by cosine. Below the gate (every sequence
>= :data:`MIN_COSINE`, their mean >= :data:`MEAN_COSINE`: the bar the tests hold int8 to on real text) the load is
refused with the figures, rather than serving worse vectors silently.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .batch import PackedBatch

log = logging.getLogger("padfree")

MIN_COSINE = 0.99
MEAN_COSINE = 0.995
_PROBE_LENGTHS = (4, 9, 17, 33, 64, 128)  # short and long sequences, capped at the model's limit
_PROBE_SEED = 20261208


@dataclass(frozen=True)
class Int8Check:
    """The load check's figures: the cosine of each probe sequence's mean-pooled int8 output to the float one."""
    cosines: tuple[float, ...]

    @property
    def min(self) -> float:
        return min(self.cosines)

    @property
    def mean(self) -> float:
        return sum(self.cosines) / len(self.cosines)

    @property
    def passed(self) -> bool:
        return self.min >= MIN_COSINE and self.mean >= MEAN_COSINE

    def describe(self) -> str:
        return (f"cosine to the float output: min {self.min:.4f} (gate {MIN_COSINE}), mean {self.mean:.4f} "
                f"(gate {MEAN_COSINE}) over {len(self.cosines)} probe sequences")


def probe_batch(vocab_size: int, max_length: int, device="cpu") -> PackedBatch:
    """The probe: sequences of :data:`_PROBE_LENGTHS` tokens (at most ``max_length``), ids drawn uniformly from the
    vocabulary by a fixed seed (the same probe for every load of a model)."""
    g = torch.Generator().manual_seed(_PROBE_SEED)
    lengths = sorted({min(n, max_length) for n in _PROBE_LENGTHS})
    return PackedBatch.from_sequences([torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths],
                                      device=device)


def check_accuracy(encoder) -> Int8Check:
    """Run the probe through ``encoder`` (an int8 :class:`padfree.models.encoder.Encoder`) with its int8 products
    and with float ones, and compare (see the module docstring). The encoder's kernels are swapped for the float
    run and restored: call it before the encoder is shared (the loader does). The float run takes the torch
    backend (``F.linear`` on the parameters): the CPU backend would pack and keep an fp32 copy of every weight."""
    cfg = encoder.config
    batch = probe_batch(cfg.vocab_size, cfg.max_sequence_length, encoder.device)
    hidden_int8 = encoder.forward_packed(batch)
    backend, plan = encoder.backend, encoder.cpu_plan
    encoder.products = "float"
    try:
        hidden_float = encoder.prepare("torch", plan).forward_packed(batch)
    finally:
        encoder.products = "int8"
        encoder.prepare(backend, plan)
    cosines = torch.nn.functional.cosine_similarity(_mean_pool(hidden_int8, batch), _mean_pool(hidden_float, batch))
    return Int8Check(tuple(cosines.tolist()))


def _mean_pool(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """``[T, H] -> [B, H]``: each sequence's mean, in fp64."""
    return torch.stack([hidden[a:b].double().mean(0) for a, b in zip(batch.cu_seqlens[:-1].tolist(),
                                                                        batch.cu_seqlens[1:].tolist())])


def gate(encoder, name: str) -> Int8Check:
    """:func:`check_accuracy`, logged; ``ValueError`` naming the model and the figures where it fails the gate."""
    check = check_accuracy(encoder)
    if not check.passed:
        raise ValueError(f"{name}: int8 products change this model's output too much ({check.describe()}); "
                         "load it with dtype fp32 (or bf16)")
    log.info("padfree: %s in int8: %s", name, check.describe())
    return check
