"""One generic encoder that runs on packed tokens ``[T, H]``.

Every family (BERT, RoBERTa, DistilBERT, ALBERT, ELECTRA, MPNet, DeBERTa-v2/v3, ModernBERT, NomicBERT,
jina-embeddings-v3) is this module with its own config and weight table (jina-v3's task adapters are merged into
the weights at load, :mod:`padfree.lora`); the differences are fields of :class:`ModelConfig` (embedding width
and projection, shared layers, absolute positions or not, relative attention kind; ModernBERT's pre-LN layers,
gated FFN, rotary positions and sliding-window layers; NomicBERT's rotary and SwiGLU in post-LN layers). Nothing
here ever sees a pad token.
The ops it calls are resolved once per device/dtype by the backend registry.
"""
from __future__ import annotations

import logging
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import PackedBatch
from ..config import ModelConfig
from ..outputs import EncoderOutput
from ..ops import native
from .. import cpu
from ..cpu import CpuPlan
from ..ops.registry import Kernels
from ..ops.relative import RelativeTables, deberta_span, device_rows
from ..ops.rotary import rotary_tables

log = logging.getLogger("padfree")


def _layer_norm(cfg: ModelConfig) -> nn.LayerNorm | nn.RMSNorm:
    if cfg.rms_norm:  # EuroBERT: a weight only
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=cfg.norm_bias)


class LayerTensors(NamedTuple):
    """One layer's parameters as the forward reads them (None where the family has no such tensor)."""
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    attn_out_weight: torch.Tensor
    attn_out_bias: torch.Tensor | None
    attn_norm_weight: torch.Tensor | None
    attn_norm_bias: torch.Tensor | None
    ffn_in_weight: torch.Tensor
    ffn_in_bias: torch.Tensor | None
    ffn_out_weight: torch.Tensor
    ffn_out_bias: torch.Tensor | None
    ffn_norm_weight: torch.Tensor
    ffn_norm_bias: torch.Tensor | None


_LAYER_MODULES = ("qkv", "attn_out", "attn_norm", "ffn_in", "ffn_out", "ffn_norm")


class EncoderLayer(nn.Module):
    """Parameter holder for one layer; the computation is in :meth:`Encoder._layer`."""

    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        H, Fi = cfg.hidden_size, cfg.intermediate_size
        self.qkv = nn.Linear(H, 3 * H, bias=cfg.attention_bias)  # Q | K | V fused at load time: one [3H, H] product
        self.attn_out = nn.Linear(H, H, bias=cfg.attention_bias)
        # post-LN: normalises after the attention; pre-LN: before it (none in ModernBERT's layer 0)
        self.attn_norm = _layer_norm(cfg) if index or cfg.first_attn_norm or not cfg.pre_norm else None
        self.ffn_in = nn.Linear(H, 2 * Fi if cfg.gated_ffn else Fi, bias=cfg.ffn_bias)  # gated: [input | gate]
        self.ffn_out = nn.Linear(Fi, H, bias=cfg.ffn_bias)
        self.ffn_norm = _layer_norm(cfg)
        own_positions = cfg.relative_attention == "disentangled" and not cfg.share_att_key
        # DeBERTa without share_att_key: per-layer projections of the relative embeddings
        self.pos_key = nn.Linear(H, H) if own_positions and "c2p" in cfg.pos_att_type else None
        self.pos_query = nn.Linear(H, H) if own_positions and "p2c" in cfg.pos_att_type else None

    def tensors(self) -> LayerTensors:
        """This layer's parameters, read from its modules' parameter dicts at each call (so a parameter replaced
        on a live encoder is used at once). ``self.qkv.weight`` would go through ``nn.Module.__getattr__`` twice,
        ~1 us a read here: 12 reads a layer were a few % of a batch-1 call (benchmarks/NOTES.md, section 16)."""
        out = []
        for name in _LAYER_MODULES:
            m = self._modules.get(name)  # (a module set to None is not in _modules)
            params = None if m is None else m._parameters
            out += (None, None) if params is None else (params["weight"], params.get("bias"))
        return LayerTensors(*out)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H = cfg.embedding_width, cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, E)
        self.position = nn.Embedding(cfg.max_position_embeddings, E) if cfg.absolute_positions else None
        self.token_type = nn.Embedding(cfg.type_vocab_size, E) if cfg.type_vocab_size else None
        self.norm = (nn.LayerNorm(H if cfg.norm_after_projection else E, eps=cfg.layer_norm_eps, bias=cfg.norm_bias)
                     if cfg.embedding_norm else None)  # EuroBERT: none
        # E -> H (ALBERT always; ELECTRA, DeBERTa with embedding_size != hidden_size)
        self.project = nn.Linear(E, H, bias=cfg.embedding_projection_bias) if cfg.has_embedding_projection else None


class RelativePositions(nn.Module):
    """The relative-position tables shared by all layers: MPNet's ``[buckets, heads]`` bias or DeBERTa's
    ``[2 * span, H]`` relative embeddings (with their optional LayerNorm)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.relative_attention == "bias":
            self.table = nn.Parameter(torch.empty(cfg.relative_buckets, cfg.num_heads))
        else:
            self.table = nn.Parameter(torch.empty(2 * deberta_span(cfg), cfg.hidden_size))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.norm_rel_embeddings else None
        self._rows: dict[tuple[int, torch.device], tuple[torch.Tensor, int, int]] = {}  # see for_batch
        self._filling = threading.Lock()

    def for_batch(self, cfg: ModelConfig, max_seqlen: int) -> RelativeTables:
        # The distance index depends only on max_seqlen: built on the host once per value and kept on the
        # device (a few KB each), so a forward makes no host-to-device copy and can be captured in a CUDA graph.
        # Many threads may run one encoder: a hit is one dict read, a miss fills the entry under a lock.
        key = (max_seqlen, self.table.device)
        rows = self._rows.get(key)
        if rows is None:
            with self._filling:
                rows = self._rows.get(key)
                if rows is None:
                    rows = self._rows[key] = device_rows(cfg, max_seqlen, self.table.device)
        norm = None if self.norm is None else (self.norm.weight, self.norm.bias)
        return RelativeTables(cfg, self.table, norm, rows)


class _SkipInit(torch.overrides.TorchFunctionMode):
    """``torch.nn.init`` functions return their tensor untouched (the weights are assigned right after).
    A torch-function mode is per thread, so other threads building modules are not affected."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else next(iter((kwargs or {}).values()))
        return func(*args, **(kwargs or {}))


class Encoder(nn.Module):
    """A padding-free encoder. Build it with :func:`padfree.from_pretrained`.

    ``Encoder(cfg)`` builds one with initialised random weights on the default device, ready to run: its ops are
    resolved (:meth:`prepare`, for the "auto" backend) when it is built, again when it is moved or cast (``.to``,
    ``.cuda``, ``.float``, ...), and whenever :meth:`prepare` is called, never by a forward. One built on the
    meta device (as :meth:`from_state` does) is prepared once its weights are assigned."""

    def __init__(self, cfg: ModelConfig, has_pooler: bool = False):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = _layer_norm(cfg) if cfg.pre_norm else None  # pre-LN: after the last layer
        self.relative = RelativePositions(cfg) if cfg.relative_attention != "none" else None
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size) if has_pooler else None
        self.kernels: Kernels | None = None  # set by prepare()
        self.backend = "auto"  # the backend asked of prepare()
        self.cpu_plan: CpuPlan | None = None  # the CPU paths prepare() resolved the kernels for
        self.compute_dtype: torch.dtype | None = None  # the forward's arithmetic (prepare(): _compute_dtype)
        self.products = "float"  # the product ops' arithmetic: "float" (compute_dtype) or "int8" (from_state)
        self.task: str | None = None  # the task LoRA adapter merged into these weights (None: base weights)
        self.adapters = None  # padfree.lora.TaskAdapters of a checkpoint with task adapters (jina-embeddings-v3)
        if self.device.type != "meta":  # meta weights: nothing to run yet (from_state prepares after assigning)
            self.prepare()

    @classmethod
    def from_state(cls, cfg: ModelConfig, state: dict[str, torch.Tensor], *, dtype: torch.dtype,
                   device: torch.device | str, backend: str = "auto",
                   replace: dict[str, torch.Tensor] | None = None, task: str | None = None,
                   adapters=None, products: str = "float") -> "Encoder":
        """An encoder whose parameters are ``state``'s tensors (padfree names; a pooler where it holds
        ``pooler.weight``), prepared for ``backend``: built on the meta device (no allocation, no init), every shape
        checked (``ValueError`` naming those that do not fit ``cfg``), the tensors cast to ``dtype`` on ``device``
        (a tensor already there is used as it is, not copied) and assigned. ``replace``: tensors taken instead of
        ``state``'s, as they are (a task adapter's merged weights). ``task`` / ``adapters``: what the weights
        merged, and the :class:`padfree.lora.TaskAdapters` they came from. ``products``: "int8" runs every product
        op on int8 weights and per-token int8 activations (:mod:`padfree.ops.int8_backend`; ``dtype`` then float32),
        "float" in ``dtype``."""
        with torch.device("meta"), _SkipInit():  # no init on meta tensors: it would import torch._dynamo (~1 s)
            model = cls(cfg, has_pooler="pooler.weight" in state)
        expected = model.state_dict()
        wrong = [f"{k}: {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in state.items()
                 if k in expected and v.shape != expected[k].shape]
        if wrong:
            raise ValueError(f"checkpoint shapes do not match its config: {wrong[:8]}")
        replace = replace or {}
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items() if k not in replace}
        state.update(replace)
        model.load_state_dict(state, assign=True, strict=True)
        model.task, model.adapters, model.products = task, adapters, products
        return model.prepare(backend)

    def prepare(self, backend: str = "auto", plan: CpuPlan | None = None) -> "Encoder":
        """Resolve the ops for this encoder's device and dtype (call after loading or moving it). ``plan``: the CPU
        paths (default: this machine's, :func:`padfree.cpu.current`; a test may pass another)."""
        self.backend = backend
        self.cpu_plan = plan or cpu.current()
        w = self.embeddings.word.weight
        self.compute_dtype = self._compute_dtype(w.device, w.dtype, backend)
        self.kernels = Kernels.resolve(w.device, self.compute_dtype, self.config.head_dim, backend,
                                       relative_scores=self.relative is not None, features=self.config.features,
                                       plan=self.cpu_plan, products=self.products)
        self.eval()
        return self

    def _apply(self, fn, recurse=True):
        """``.to``, ``.cuda``, ``.float``, ``.half``, ...: moved or cast, the encoder re-resolves its ops for the new
        device and dtype (the backend and CPU plan asked before), so its kernels always fit its weights."""
        super()._apply(fn, recurse)
        if self.device.type != "meta":
            self.prepare(self.backend, self.cpu_plan)
        return self

    # the CPU backend's ops that take fp32 activations with bf16 weights (its packed fp32 or widened copies)
    _MIXED_OPS = ("embed_layer_norm", "qkv_varlen_attention", "linear_bias_act", "linear_residual_layer_norm",
                  "linear_tanh", "post_ln_layers")

    def _compute_dtype(self, device: torch.device, dtype: torch.dtype, backend: str) -> torch.dtype:
        """The dtype the forward computes in: the weights', except a bf16 model on a CPU where bf16 products are
        slower than fp32 (``plan.bf16_compute`` False: AVX2-only, or AVX-512 BF16 at half rate): there a plain
        post-LN model whose every op is the CPU backend's computes in fp32 on its bf16 weights (fp32 copies packed
        once for the products, widened in registers in the native stack; half the memory of an fp32 model's weights,
        fp32's speed; benchmarks/NOTES.md section 22) and rounds its output to bf16 once. Other models keep bf16
        arithmetic, which a warning at load said is slower here."""
        cfg = self.config
        if device.type != "cpu" or dtype != torch.bfloat16 or self.cpu_plan.bf16_compute:
            return dtype
        plain = self.relative is None and not cfg.pre_norm and not cfg.features  # the embedding runs in bf16 anyway
        names = Kernels.resolve(device, torch.float32, cfg.head_dim, backend, plan=self.cpu_plan).names
        if plain and all(names.get(op) == "onednn" for op in self._MIXED_OPS):
            log.info("padfree: bf16 weights, fp32 arithmetic (%s)", self.cpu_plan.reasons["bf16_compute"])
            return torch.float32
        log.warning("padfree: this %s model computes in bf16 on %s, where bf16 products are slower than fp32 (%s); "
                    "dtype='auto' (float32 here) runs faster", cfg.family, self.cpu_plan.profile.uarch,
                    self.cpu_plan.reasons["bf16_compute"].split(":")[0])
        return dtype

    def for_task(self, task: str | None) -> "Encoder":
        """The encoder running ``task``'s LoRA adapter (None: the base weights): this one if it is its task,
        else one merged from the same checkpoint on first use and kept (:class:`padfree.lora.TaskAdapters`);
        ``ValueError`` for an unknown task or a model without adapters."""
        if task == self.task:
            return self
        if self.adapters is None:
            raise ValueError(f"task {task!r} given, but this {self.config.family} model has no task adapters")
        return self.adapters.encoder(task)

    @property
    def device(self) -> torch.device:
        return self.embeddings.word.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word.weight.dtype

    # ------------------------------------------------------------------ packed path
    def check_batch(self, batch: PackedBatch) -> None:
        """``ValueError`` if the batch cannot be encoded by this model (ids, types, positions or lengths out of
        range)."""
        cfg = self.config
        if batch.max_seqlen > cfg.max_sequence_length:
            raise ValueError(f"sequence length {batch.max_seqlen} exceeds the model's limit of "
                             f"{cfg.max_sequence_length} tokens (max_position_embeddings)")
        checked = [batch.input_ids, batch.token_type_ids]
        if self.embeddings.position is not None:  # position ids index the table only where the family has one
            checked.append(batch.position_ids)
        # min and max of each in one host read
        bounds = torch.stack([v.long() for t in checked for v in torch.aminmax(t)]).tolist()
        (id_lo, id_hi), (type_lo, type_hi) = bounds[0:2], bounds[2:4]
        if id_lo < 0 or id_hi >= cfg.vocab_size:
            raise ValueError(f"token id {id_lo if id_lo < 0 else id_hi} is outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
        n_types = max(cfg.type_vocab_size, 1)
        if type_lo < 0 or type_hi >= n_types:
            raise ValueError(f"token_type_ids must be in [0, {n_types}); got values in [{type_lo}, {type_hi}]")
        if len(bounds) == 6 and (bounds[4] < 0 or bounds[5] >= cfg.max_sequence_length):
            off = cfg.position_offset
            raise ValueError(f"position_ids must be in [0, {cfg.max_sequence_length}) (rows [{off}, "
                             f"{cfg.max_position_embeddings}) of the position table as transformers numbers them); "
                             f"got values in [{bounds[4]}, {bounds[5]}]" + (f" (rows [{bounds[4] + off}, "
                             f"{bounds[5] + off}])" if off else ""))

    @torch.inference_mode()
    def forward_packed(self, batch: PackedBatch, check: bool = True, task: str | None = None) -> torch.Tensor:
        """Hidden states of every real token: ``[T, H]``. ``task``: run another task's adapter than the one
        merged at load (None: this encoder's own weights); see :meth:`for_task`."""
        if task is not None and task != self.task:
            return self.for_task(task).forward_packed(batch, check)
        if self.kernels is None:  # built on the meta device and assigned weights by hand: never prepared
            raise RuntimeError("this Encoder's ops are not resolved: call .prepare() once its weights are in place "
                               "(padfree.from_pretrained and Encoder(cfg) do)")
        if check:
            self.check_batch(batch)
        if self.device.type == "cpu":
            native.pin_workers(self.cpu_plan)  # torch's OpenMP workers one per CPU, once per calling thread
        x = self._embed(batch).to(self.compute_dtype)  # [T, H]
        cfg = self.config
        rel = None if self.relative is None else self.relative.for_batch(cfg, batch.max_seqlen)
        # RoPE tables [T, d/2] from the per-sequence positions, once per base (global / local) per forward
        rotary = {t: rotary_tables(batch.position_ids, cfg.head_dim, t)
                  for t in {cfg.theta(i) for i in cfg.schedule} if t > 0}
        layers = list(self.layers)  # (indexing the ModuleList costs microseconds a layer)
        if cfg.pre_norm:
            for i in cfg.schedule:
                x = self._pre_norm_layer(i, layers[i], x, batch, rotary)
            return self._norm(x, self.final_norm.weight, getattr(self.final_norm, "bias", None))
        if rel is None and not rotary and not cfg.gated_ffn:  # plain layers: a backend may run the stack at once
            stack = self.kernels.post_ln_layers(x, [layers[i] for i in cfg.schedule], batch.runs, cfg.num_heads,
                                                cfg.attention_scale, cfg.layer_norm_eps, cfg.activation)
            if stack is not None:
                return stack.to(self.dtype)
        for i in cfg.schedule:  # ALBERT runs shared layers several times
            x = self._layer(layers[i], x, batch, rel, rotary.get(cfg.theta(i)))
        return x.to(self.dtype)

    def _embed(self, batch: PackedBatch) -> torch.Tensor:
        """``LayerNorm(word + position + type)`` then the optional E -> H projection (DeBERTa: projection
        first, LayerNorm over H after; EuroBERT: no LayerNorm): ``[T, H]``."""
        k, cfg, e = self.kernels, self.config, self.embeddings
        position = None if e.position is None else e.position.weight[cfg.position_offset:]  # offset rows skipped
        token_type = None if e.token_type is None else e.token_type.weight
        if e.norm is None or (e.project is not None and cfg.norm_after_projection):
            y = F.embedding(batch.input_ids, e.word.weight)  # [T, E]
            if position is not None:
                y = y + F.embedding(batch.position_ids, position)
            if token_type is not None:
                y = y + F.embedding(batch.token_type_ids, token_type)
            if e.project is not None:
                y = F.linear(y, e.project.weight, e.project.bias)  # [T, H]
            if e.norm is None:
                return y
            return F.layer_norm(y, y.shape[-1:], e.norm.weight, e.norm.bias, cfg.layer_norm_eps)
        x = k.embed_layer_norm(batch.input_ids, batch.position_ids, batch.token_type_ids, e.word.weight,
                               position, token_type, e.norm.weight, e.norm.bias, cfg.layer_norm_eps)  # [T, E]
        return x if e.project is None else F.linear(x, e.project.weight, e.project.bias)  # [T, H]

    def _layer(self, layer: EncoderLayer, x: torch.Tensor, batch: PackedBatch,
               rel: RelativeTables | None = None, rotary: tuple | None = None) -> torch.Tensor:
        """Post-LN layer; ``rotary``: the layer's RoPE tables (NomicBERT), None = no rotation."""
        k, cfg, t = self.kernels, self.config, layer.tensors()
        scores = None if rel is None else rel.scores(t.qkv_weight, t.qkv_bias, layer.pos_key, layer.pos_query)
        extra = {} if rotary is None else {"rotary": rotary}  # only where used: backends without it keep working
        ctx = k.qkv_varlen_attention(x, t.qkv_weight, t.qkv_bias, batch.cu_seqlens, batch.max_seqlen,
                                     cfg.num_heads, cfg.attention_scale, scores, runs=batch.runs, **extra)  # [T, H]
        # each remaining op is a linear fused with its consumer (a backend's epilogue, or F.linear + the primitive)
        h = k.linear_residual_layer_norm(ctx, t.attn_out_weight, t.attn_out_bias, x, t.attn_norm_weight,
                                         t.attn_norm_bias, cfg.layer_norm_eps)
        act = k.linear_gated_act if cfg.gated_ffn else k.linear_bias_act  # NomicBERT: SwiGLU
        f = act(h, t.ffn_in_weight, t.ffn_in_bias, cfg.activation)  # [T, F]
        return k.linear_residual_layer_norm(f, t.ffn_out_weight, t.ffn_out_bias, h, t.ffn_norm_weight,
                                            t.ffn_norm_bias, cfg.layer_norm_eps)

    def _pre_norm_layer(self, i: int, layer: EncoderLayer, x: torch.Tensor, batch: PackedBatch,
                        rotary: dict) -> torch.Tensor:
        """Pre-LN parameter layer ``i`` (ModernBERT, EuroBERT): ``x + attn(norm(x))`` then ``x + ffn(norm(x))``; the
        attention rotates Q and K by the layer's RoPE base and, in a local layer, sees only its window."""
        k, cfg, t = self.kernels, self.config, layer.tensors()
        h = x if t.attn_norm_weight is None else self._norm(x, t.attn_norm_weight, t.attn_norm_bias)
        extra = {"rotary": rotary[cfg.theta(i)]} if cfg.theta(i) > 0 else {}
        if cfg.window(i) is not None:
            extra["window"] = cfg.window(i)
        ctx = k.qkv_varlen_attention(h, t.qkv_weight, t.qkv_bias, batch.cu_seqlens, batch.max_seqlen,
                                     cfg.num_heads, cfg.attention_scale, runs=batch.runs, **extra)  # [T, H]
        x = k.linear_residual(ctx, t.attn_out_weight, t.attn_out_bias, x)
        h = self._norm(x, t.ffn_norm_weight, t.ffn_norm_bias)
        act = k.linear_gated_act if cfg.gated_ffn else k.linear_bias_act
        f = act(h, t.ffn_in_weight, t.ffn_in_bias, cfg.activation)  # [T, F]
        return k.linear_residual(f, t.ffn_out_weight, t.ffn_out_bias, x)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """A pre-LN norm: RMSNorm (EuroBERT, the ``rms_norm`` op) or LayerNorm (ModernBERT)."""
        if self.config.rms_norm:
            return self.kernels.rms_norm(x, weight, self.config.layer_norm_eps)
        return F.layer_norm(x, x.shape[-1:], weight, bias, self.config.layer_norm_eps)

    def pool_cls(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """The BERT pooler: ``tanh(W · h_CLS + b)``, ``[B, H]``; ``ValueError`` if the checkpoint has none."""
        if self.pooler is None:
            raise ValueError("this checkpoint has no pooler weights")
        cls = hidden[batch.cu_seqlens[:-1].long()].to(self.compute_dtype)  # [B, H], first token of each sequence
        return self.kernels.linear_tanh(cls, self.pooler.weight, self.pooler.bias).to(self.dtype)

    # ------------------------------------------------------------------ Hugging Face-compatible path
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                task: str | None = None) -> EncoderOutput:
        """``input_ids``/``attention_mask``/``token_type_ids``/``position_ids``: ``[B, S]``. Padding may be on
        either side. Without ``position_ids``, positions restart at 0 at each sequence's first real token, so a
        sequence's output does not depend on its padding; with them, they are rows of the position table as
        transformers reads them (RoBERTa and MPNet count from ``pad_token_id + 1``), e.g. to reproduce
        transformers' own numbering from column 0 under left padding. ``task``: another task adapter than the
        one merged at load (jina-embeddings-v3; see :meth:`for_task`)."""
        if task is not None and task != self.task:
            return self.for_task(task).forward(input_ids, attention_mask, token_type_ids, position_ids)
        batch = self.pack(input_ids, attention_mask, token_type_ids, position_ids)
        hidden = self.forward_packed(batch)
        pooled = self.pool_cls(hidden, batch) if self.pooler is not None else None
        return EncoderOutput(batch.unpack(hidden), pooled)

    def pack(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None) -> PackedBatch:
        """The :class:`PackedBatch` of a padded ``[B, S]`` call (see :meth:`forward` for the arguments), on this
        encoder's device (packed where the inputs are, then moved); the heads' Hugging Face-style calls pack through
        it too."""
        input_ids = torch.as_tensor(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is not None:
            position_ids = self._table_rows_to_positions(position_ids)
        batch = PackedBatch.from_padded(input_ids, attention_mask, token_type_ids, position_ids)
        return batch if batch.input_ids.device == self.device else batch.to(self.device)

    def _table_rows_to_positions(self, position_ids) -> torch.Tensor:
        """transformers' ``position_ids`` (rows of the position table, ``[B, S]``) as padfree positions: the row
        minus the family's offset. Shape and range are checked where the batch is packed and encoded."""
        cfg = self.config
        position_ids = torch.as_tensor(position_ids)
        if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
            raise ValueError(f"position_ids must be an integer tensor; got {position_ids.dtype}")
        return position_ids - cfg.position_offset  # the range is checked on the packed batch (check_batch)
