"""Task LoRA adapters merged into the weights (jina-embeddings-v3).

jina-embeddings-v3 carries one low-rank adapter per task (``lora_adaptations`` in its config: retrieval.query,
retrieval.passage, separation, classification, text-matching) on its word and token-type embeddings and on every
linear of its layers. padfree never applies an adapter per token: the chosen task's adapters are merged into the
weights once, ``W + scale * B A`` with ``scale = lora_alpha / lora_rank`` (jinaai's ``LoRAParametrization``), and
the encoder then runs like any other family.

Checkpoint layout (jinaai's remote code, one row per task in ``lora_adaptations`` order), keyed by the module that
carries the adapter: a linear ``[out, in]`` has ``<module>.lora_A [tasks, r, in]`` and ``<module>.lora_B
[tasks, out, r]``, delta ``B[t] @ A[t]``; an embedding ``[V, E]`` has ``lora_A [tasks, V, r]`` and ``lora_B
[tasks, r, E]``, delta ``A[t] @ B[t]``. jinaai's original names (``<module>.parametrizations.weight.original``
for the base weight, ``<module>.parametrizations.weight.0.lora_A`` / ``lora_B``) are read as the same.
Q, K and V are one fused ``mixer.Wqkv`` adapter in jinaai's layout and three (``q_proj``, ``k_proj``, ``v_proj``)
in transformers' module names; either is stacked into padfree's ``[3H, H]`` delta.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .models.encoder import Encoder

if TYPE_CHECKING:
    from .config import ModelConfig
    from .models.families import Family

_PARAMETRIZED = ".parametrizations.weight."


@dataclass(frozen=True)
class LoraConfig:
    tasks: tuple[str, ...]  # lora_adaptations: task names, in the order of the adapters' first dimension
    rank: int               # lora_rank
    alpha: float            # lora_alpha

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def read_lora_config(c: dict) -> LoraConfig | None:
    """The adapters a config declares (``lora_adaptations``, ``lora_rank``, ``lora_alpha``); None: no adapters."""
    tasks = c.get("lora_adaptations")
    if not tasks:
        return None
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks) \
            or len(set(tasks)) != len(tasks):
        raise ValueError(f"lora_adaptations must be a list of distinct task names; got {tasks!r}")
    rank, alpha = c.get("lora_rank", 4), c.get("lora_alpha", 1)
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora_rank must be a positive int; got {rank!r}")
    return LoraConfig(tuple(tasks), rank, float(alpha))


def check_task(family: "Family", lora: LoraConfig | None, task: str | None) -> None:
    """``ValueError`` for a task the checkpoint cannot run: an unknown name (listing the known ones), or any task
    for a model without adapters. None (no task) is always valid: the base weights, as transformers computes."""
    if task is None:
        return
    if lora is None:
        raise ValueError(f"task {task!r} given, but this {family.name} checkpoint has no task adapters "
                         f"(no lora_adaptations in its config)")
    if task not in lora.tasks:
        raise ValueError(f"unknown task {task!r}; this checkpoint's tasks are {list(lora.tasks)}")


def split_adapters(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(base state, adapter factors)`` of a checkpoint: jinaai's parametrized names read as plain ones
    (``X.parametrizations.weight.original`` -> ``X.weight``), every ``*.lora_A`` / ``*.lora_B`` moved to the factors,
    keyed without the base-model prefix."""
    base, factors = {}, {}
    for key, value in state.items():
        if _PARAMETRIZED in key:
            module, rest = key.split(_PARAMETRIZED, 1)
            key = f"{module}.weight" if rest == "original" else f"{module}.{rest.split('.')[-1]}"
        if key.endswith((".lora_A", ".lora_B")):
            for prefix in prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    break
            factors[key] = value
        else:
            base[key] = value
    return base, factors


def _delta(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One task's ``B A`` (linear, ``[out, in]``) or ``A B`` (embedding, ``[V, E]``), in fp32."""
    return (b.float() @ a.float()) if kind == "linear" else (a.float() @ b.float())


class TaskAdapters:
    """The adapters of one loaded checkpoint and the encoders merged from them, one per task used.

    Holds the base (unmerged) value of every adapted weight in the checkpoint's dtype on the host (for an fp32
    checkpoint loaded on the CPU in fp32 these are the tensors the no-task encoder runs on: no copy) and the
    factors (``tasks x r x (in + out)`` per weight: small). :meth:`encoder` builds a task's encoder on first use
    and keeps it: it shares every weight without an adapter (LayerNorms, biases, pooler) with the encoder loaded
    first and holds its own copy of every adapted one (the word and token-type embeddings and each layer's four
    linears: for jina-embeddings-v3 nearly all of the model, ~570M parameters), so each task used costs about
    one model's memory at the encoder's dtype, once. Re-merging on every switch would save that memory but cost
    a full pass over the weights per switch; keeping them makes switching free, and a process uses few tasks.
    """

    def __init__(self, cfg: "ModelConfig", lora: LoraConfig, parts: dict[str, tuple[str, list]],
                 base: dict[str, torch.Tensor]):
        self.cfg, self.lora = cfg, lora
        self.parts = parts      # padfree name -> (kind, [(A [tasks, ...], B [tasks, ...]), ...] stacked on dim 0)
        self.base = base        # padfree name -> base weight (checkpoint dtype, host)
        self._encoders: dict[str | None, "Encoder"] = {}
        self._filling = threading.Lock()

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.lora.tasks

    @classmethod
    def build(cls, family: "Family", cfg: "ModelConfig", lora: LoraConfig, factors: dict[str, torch.Tensor],
              base_state: dict[str, torch.Tensor]) -> "TaskAdapters":
        """Match the checkpoint's factors to the family's targets; ``ValueError`` naming any factor no target
        uses, any target missing half of its pair, or shapes that do not fit the weight."""
        parts, used, n = {}, set(), len(lora.tasks)
        for name, (kind, alternatives) in family.lora_targets(cfg).items():
            modules = next((m for m in alternatives if any(f"{x}.lora_A" in factors or f"{x}.lora_B" in factors
                                                           for x in m)), None)
            if modules is None:
                continue  # no adapter on this weight in this checkpoint
            pairs = []
            for m in modules:
                a, b = factors.get(f"{m}.lora_A"), factors.get(f"{m}.lora_B")
                if a is None or b is None:
                    raise ValueError(f"adapter of {m} lacks {'lora_A' if a is None else 'lora_B'}")
                if a.dim() != 3 or b.dim() != 3 or a.shape[0] != n or b.shape[0] != n:
                    raise ValueError(f"adapter of {m}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} must be "
                                     f"[tasks={n}, ...] (one row per lora_adaptations entry)")
                pairs.append((a, b))
                used.update((f"{m}.lora_A", f"{m}.lora_B"))
            delta = torch.cat([_delta(kind, a[0], b[0]) for a, b in pairs])
            if name not in base_state or delta.shape != base_state[name].shape:
                raise ValueError(f"adapter of {modules} makes a {tuple(delta.shape)} delta for {name}, whose weight "
                                 f"is {tuple(base_state[name].shape) if name in base_state else 'absent'}")
            parts[name] = (kind, pairs)
        unused = sorted(set(factors) - used)
        if unused:
            raise ValueError(f"checkpoint holds {len(unused)} adapter weights padfree does not use: {unused[:8]}")
        if not parts:
            raise ValueError("the config declares lora_adaptations but the checkpoint holds no adapter weights")
        return cls(cfg, lora, parts, {k: base_state[k] for k in parts})

    def merged(self, task: str | None, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        """The adapted weights for ``task`` (None: the base ones): ``W + scale * delta`` computed in fp32 from the
        base weight, then cast to ``dtype`` on ``device``."""
        if task is None:
            return {k: v.to(device=device, dtype=dtype) for k, v in self.base.items()}
        t = self.lora.tasks.index(task)
        out = {}
        for name, (kind, pairs) in self.parts.items():
            delta = torch.cat([_delta(kind, a[t], b[t]) for a, b in pairs])
            out[name] = (self.base[name].float() + self.lora.scale * delta).to(device=device, dtype=dtype)
        return out

    def register(self, encoder: "Encoder") -> None:
        """The encoder loaded first: it serves its own task, and lends its unadapted weights to the others."""
        self._encoders[encoder.task] = encoder

    def encoder(self, task: str | None) -> "Encoder":
        """The encoder for ``task`` (None: the base weights), merged on first use and kept (see the class)."""
        if task is not None and task not in self.lora.tasks:
            raise ValueError(f"unknown task {task!r}; this checkpoint's tasks are {list(self.lora.tasks)}")
        enc = self._encoders.get(task)
        if enc is None:
            with self._filling:
                enc = self._encoders.get(task)
                if enc is None:
                    enc = self._encoders[task] = self._build(task)
        return enc

    def _build(self, task: str | None) -> "Encoder":
        """``task``'s encoder: the first one's tensors, its adapted ones replaced by ``task``'s merge (the same
        build as a load's: :meth:`Encoder.from_state`)."""
        like = next(iter(self._encoders.values()))
        with torch.inference_mode(False), torch.no_grad():  # may be called from a forward (inference mode)
            return Encoder.from_state(like.config, dict(like.state_dict()), dtype=like.dtype, device=like.device,
                                      backend=like.backend, replace=self.merged(task, like.dtype, like.device),
                                      task=task, adapters=self, products=like.products)
