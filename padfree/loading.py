"""Loading Hugging Face checkpoints into padfree encoders.

A checkpoint (a local directory or an in-memory ``transformers`` model) is read once, its keys mapped by
the family's explicit table (QKV fused into one ``[3H, H]`` weight here), every key and shape checked, and
the encoder built on the meta device and filled with ``load_state_dict(assign=True)``
(:meth:`padfree.Encoder.from_state`). A directory needs no ``transformers``; anything else than a directory or a
model object is an error naming the ``hf`` extra where transformers is not installed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import int8
from ._hf import have_transformers, missing
from .config import ModelConfig
from .cpu import choose_dtype
from .hub import resolve_source
from .lora import TaskAdapters, check_task, read_lora_config, split_adapters
from .models.encoder import Encoder
from .models.families import Family, WeightTable, family_for_config


def _is_model(source) -> bool:
    return hasattr(source, "state_dict") and hasattr(source, "config")


def _directory(source) -> Path:
    """``source`` as a directory's path; for anything else than a ``str`` or ``os.PathLike``: ``ImportError``
    naming the ``hf`` extra where transformers is not installed (an in-memory model is its objects), else
    ``TypeError`` saying what is accepted."""
    if isinstance(source, (str, os.PathLike)):
        return Path(source)
    what = f"an object of type {type(source).__name__!r}"
    if not have_transformers():
        raise missing(f"got {what}, not a model directory: loading an in-memory model")
    raise TypeError(f"expected a model directory (a str or os.PathLike) or an in-memory transformers model "
                    f"(with .config and .state_dict()); got {what}")


def read_config(source) -> dict:
    """The ``config.json`` dict of a directory or an in-memory ``transformers`` model."""
    if _is_model(source):
        return source.config.to_dict()
    path = _directory(source)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory: no config.json")
    return json.loads((path / "config.json").read_text())


def read_weights(source) -> dict[str, torch.Tensor]:
    """The state dict of a directory (safetensors or PyTorch, sharded or not) or an in-memory model."""
    return dict(source.state_dict()) if _is_model(source) else _read_weights(_directory(source))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", _load_bin)):
        if (path / index_name).is_file():
            shards = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in loader(path / shard).items()}
    if (path / "pytorch_model.bin").is_file():
        return _load_bin(path / "pytorch_model.bin")
    raise ValueError(f"no weights in {path}: expected model.safetensors or pytorch_model.bin")


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True)


def _absent(table: WeightTable, state: dict) -> int:
    """How many of the table's checkpoint names ``state`` lacks."""
    return sum(s not in state for source in table.values() for s in ((source,) if isinstance(source, str) else source))


def map_weights(family: Family, cfg: ModelConfig, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """padfree's state dict from a checkpoint's, by the family's table.

    ``ValueError`` naming the keys when a weight the table needs is missing, or when the base model holds a
    weight the table does not use (padfree would compute something else than the checkpoint's model). Keys
    outside the base prefix of a task checkpoint (heads) are not the encoder's; ``family.ignored`` lists the
    buffers that may stay unused."""
    state = dict(hf_state)
    for prefix in family.prefixes:  # task checkpoints nest the base model under a prefix
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    else:
        prefix = ""
    tables = [family.weight_table(cfg)] + ([family.other_layout(cfg)] if family.other_layout else [])
    out, missing, used = {}, [], set()
    for name, source in min(tables, key=lambda table: _absent(table, state)).items():  # ties: the first
        sources = (source,) if isinstance(source, str) else source
        absent = [s for s in sources if s not in state]
        if absent:
            if name not in family.optional:
                missing.extend(absent)
            continue
        out[name] = state[sources[0]] if len(sources) == 1 else torch.cat([state[s] for s in sources], dim=0)
        if cfg.kv_heads and name.endswith((".qkv.weight", ".qkv.bias")):
            out[name] = _repeat_kv(out[name], cfg)
        used.update(sources)
    if missing:
        raise ValueError(f"checkpoint for {family.name} is missing {len(missing)} weights: "
                         f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    unused = sorted(prefix + k for k in set(state) - used - set(family.ignored))
    if unused:
        raise ValueError(f"checkpoint for {family.name} holds {len(unused)} base-model weights padfree does not "
                         f"use (its output would differ from the checkpoint's model): "
                         f"{unused[:8]}{' ...' if len(unused) > 8 else ''}")
    return out


def _repeat_kv(qkv: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """A grouped-query ``Q | K | V`` weight (or bias) ``[H + 2 kv d, ...]`` as multi-head ``[3H, ...]``: each K and
    V head repeated for the ``heads / kv`` query heads it serves (transformers' ``repeat_kv``: query head i reads
    K/V head ``i // (heads / kv)``). Exact; the QKV product computes the repeats (a few % more FLOPs than GQA)."""
    H, d, kv = cfg.hidden_size, cfg.head_dim, cfg.kv_heads
    if qkv.shape[0] != H + 2 * kv * d:
        return qkv  # a wrong shape is reported with the others by the loader
    q, k, v = qkv.split([H, kv * d, kv * d])
    group = cfg.num_heads // kv
    expand = lambda x: x.unflatten(0, (kv, d)).repeat_interleave(group, dim=0).flatten(0, 1)  # noqa: E731
    return torch.cat([q, expand(k), expand(v)])


def from_pretrained(source, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    backend: str = "auto", task: str | None = None, *, revision: str | None = None,
                    token: str | None = None) -> Encoder:
    """A padfree :class:`Encoder` from a Hugging Face directory, a Hub ID (``org/name``) or an in-memory
    ``transformers`` model.

    A Hub ID is read from huggingface_hub's cache, the files padfree reads downloaded where missing
    (:func:`padfree.hub.resolve_model`; ``HF_HUB_OFFLINE=1``: the cache only); ``revision``: its branch, tag or
    commit (None: the default branch); ``token``: for private and gated repos (None: ``HF_TOKEN`` or the login).

    ``dtype``: a torch.dtype, a name (fp32, bf16, fp16) or "auto": the fastest on this machine
    (:func:`padfree.cpu.choose_dtype`: bf16 where the CPU's bf16 products beat fp32, else fp32; a bf16 asked where
    it is slower is kept, with a warning). ``backend``: "auto" (the registry's priority order) or a backend name ("torch", "triton", "onednn": the CPU's
    fused linears with the torch primitives); a named backend that cannot run raises a ``ValueError`` saying why.
    ``task``: for a checkpoint with task LoRA adapters (jina-embeddings-v3: "retrieval.query",
    "retrieval.passage", "separation", "classification", "text-matching"), the adapter merged into the weights
    at load; None runs the base weights, as transformers does. An unknown task is a ``ValueError`` listing the
    known ones, raised before any weight is read. Other tasks stay reachable per call
    (``encoder(ids, mask, task=...)``, :meth:`Encoder.for_task`), merged on first use (see
    :class:`padfree.lora.TaskAdapters` for the memory this costs).
    """
    return load(resolve_source(source, revision, token), dtype, device, backend, task).encoder


@dataclass
class Loaded:
    """What :func:`load` read: the encoder plus the checkpoint it came from (for task heads)."""
    encoder: Encoder
    family: Family
    hf_config: dict                   # the checkpoint's config.json
    hf_state: dict[str, torch.Tensor]  # every checkpoint tensor, by its Hugging Face name


def check_dtype(dtype: torch.dtype, device="cpu") -> None:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.int8):
        raise ValueError(f"dtype {dtype} is not supported; use torch.float32, torch.bfloat16, torch.float16 or "
                         "torch.int8 (int8 products)")
    if dtype == torch.int8 and torch.device(device).type != "cpu":
        raise ValueError(f"dtype int8 runs on the CPU only (padfree's native int8 products); on {device} use bf16 "
                         "or fp16")


def load(source, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
         backend: str = "auto", task: str | None = None) -> Loaded:
    """Read a checkpoint once and build its encoder; the raw config and state stay available for heads.
    ``task``: the LoRA adapter merged into the weights (see :func:`from_pretrained`); ``dtype``: a torch.dtype, a
    name (fp32, bf16, fp16) or "auto" (:func:`padfree.cpu.choose_dtype`: the fastest for this CPU)."""
    dtype = choose_dtype(dtype, device)
    check_dtype(dtype, device)
    products = "int8" if dtype == torch.int8 else "float"  # int8: fp32 weights, int8 products (padfree.int8)
    dtype = torch.float32 if dtype == torch.int8 else dtype
    hf_config = read_config(source)
    family = family_for_config(hf_config)
    cfg = family.make_config(hf_config)  # unsupported types/activations fail here, before any weight is read
    lora = read_lora_config(hf_config) if family.lora_targets else None
    check_task(family, lora, task)  # an unknown task too
    hf_state = read_weights(source)
    factors = {}
    if family.lora_targets:  # adapter factors are the adapters' business, not the base table's
        hf_state, factors = split_adapters(hf_state, family.prefixes)
        if factors and lora is None:
            raise ValueError(f"checkpoint holds {len(factors)} adapter weights but its config has no "
                             f"lora_adaptations: {sorted(factors)[:4]}")
    state = map_weights(family, cfg, hf_state)
    adapters = TaskAdapters.build(family, cfg, lora, factors, state) if lora is not None else None
    merged = adapters.merged(task, dtype, device) if task is not None else None  # once: W + scale * B A, then cast
    model = Encoder.from_state(cfg, state, dtype=dtype, device=device, backend=backend, replace=merged,
                               task=task, adapters=adapters, products=products)
    if products == "int8":
        int8.gate(model, str(source) if isinstance(source, (str, Path)) else type(source).__name__)
    if adapters is not None:
        adapters.register(model)
    return Loaded(model, family, hf_config, hf_state)
