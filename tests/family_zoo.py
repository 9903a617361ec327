"""Random-weight Hugging Face models of every padfree family, two shapes each, and helpers to compare.

Shapes are tiny (CPU, shared machine). Weights are redrawn with a larger spread than HF's init (std 0.02)
so that attention is far from uniform and a wrong mapping cannot hide.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import transformers as t

VOCAB = 60
MAX_LEN = 40  # every shape allows 40 real tokens; batches include length 1 and length 40

# family -> (config class, base, *ForSequenceClassification, *ForTokenClassification, [shape kwargs, ...])
ZOO = {
    "bert": (t.BertConfig, t.BertModel, t.BertForSequenceClassification, t.BertForTokenClassification, [
        dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=37,
             max_position_embeddings=MAX_LEN),
        dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=3, intermediate_size=64, hidden_act="gelu_new",
             type_vocab_size=3, layer_norm_eps=1e-5, max_position_embeddings=MAX_LEN + 8)]),
    "roberta": (t.RobertaConfig, t.RobertaModel, t.RobertaForSequenceClassification,
                t.RobertaForTokenClassification, [
        dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=37, pad_token_id=1,
             max_position_embeddings=MAX_LEN + 2, type_vocab_size=1),
        dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, pad_token_id=1,
             hidden_act="relu", max_position_embeddings=MAX_LEN + 2, type_vocab_size=1, layer_norm_eps=1e-5)]),
    "xlm-roberta": (t.XLMRobertaConfig, t.XLMRobertaModel, t.XLMRobertaForSequenceClassification,
                    t.XLMRobertaForTokenClassification, [
        dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=37, pad_token_id=1,
             max_position_embeddings=MAX_LEN + 2, type_vocab_size=1),
        dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=2, intermediate_size=50, pad_token_id=1,
             max_position_embeddings=MAX_LEN + 2, type_vocab_size=1, layer_norm_eps=1e-5)]),
    "camembert": (t.CamembertConfig, t.CamembertModel, t.CamembertForSequenceClassification,
                  t.CamembertForTokenClassification, [
        dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=37, pad_token_id=1,
             max_position_embeddings=MAX_LEN + 2, type_vocab_size=1),
        dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, pad_token_id=1,
             max_position_embeddings=MAX_LEN + 2, type_vocab_size=1, hidden_act="gelu_new")]),
    "distilbert": (t.DistilBertConfig, t.DistilBertModel, t.DistilBertForSequenceClassification,
                   t.DistilBertForTokenClassification, [
        dict(dim=32, n_heads=2, n_layers=2, hidden_dim=37, max_position_embeddings=MAX_LEN),
        dict(dim=48, n_heads=4, n_layers=3, hidden_dim=64, activation="relu", sinusoidal_pos_embds=True,
             max_position_embeddings=MAX_LEN + 8)]),
    "albert": (t.AlbertConfig, t.AlbertModel, t.AlbertForSequenceClassification, t.AlbertForTokenClassification, [
        dict(embedding_size=16, hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=37,
             max_position_embeddings=MAX_LEN),  # one shared layer run twice
        dict(embedding_size=24, hidden_size=48, num_attention_heads=4, num_hidden_layers=4, num_hidden_groups=2,
             inner_group_num=2, intermediate_size=64, hidden_act="gelu", max_position_embeddings=MAX_LEN)]),
    "electra": (t.ElectraConfig, t.ElectraModel, t.ElectraForSequenceClassification,
                t.ElectraForTokenClassification, [
        dict(embedding_size=16, hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=37,
             max_position_embeddings=MAX_LEN),  # E != H: embeddings_project
        dict(embedding_size=48, hidden_size=48, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
             max_position_embeddings=MAX_LEN)]),
    "mpnet": (t.MPNetConfig, t.MPNetModel, t.MPNetForSequenceClassification, t.MPNetForTokenClassification, [
        dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=37, pad_token_id=1,
             max_position_embeddings=MAX_LEN + 2),
        dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=3, intermediate_size=64, pad_token_id=1,
             max_position_embeddings=MAX_LEN + 2, layer_norm_eps=1e-5)]),
    "deberta-v2": (t.DebertaV2Config, t.DebertaV2Model, t.DebertaV2ForSequenceClassification,
                   t.DebertaV2ForTokenClassification, [
        # v3-like: shared keys, log buckets (8 < 40 real tokens: the log branch runs), no absolute positions
        dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=37,
             max_position_embeddings=MAX_LEN, relative_attention=True, pos_att_type="p2c|c2p", share_att_key=True,
             position_buckets=8, norm_rel_ebd="layer_norm", position_biased_input=False, max_relative_positions=-1,
             layer_norm_eps=1e-7, pooler_hidden_act="gelu"),
        # v2-like: own position projections, clamped distances (6), absolute positions, token types, E != H
        dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, embedding_size=24,
             max_position_embeddings=MAX_LEN, relative_attention=True, pos_att_type=["c2p", "p2c"],
             share_att_key=False, position_buckets=-1, max_relative_positions=6, norm_rel_ebd="none",
             position_biased_input=True, type_vocab_size=2, pooler_hidden_act="tanh")]),
}
CASES = [(f, i) for f in ZOO for i in range(2)]


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Redraw every parameter (LayerNorm weights around 1), keeping DistilBERT's sinusoidal table."""
    g = torch.Generator().manual_seed(seed)
    sinusoidal = getattr(model.config, "sinusoidal_pos_embds", False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if sinusoidal and "position_embeddings" in name:
                continue
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1 + noise if "LayerNorm.weight" in name or "layer_norm.weight" in name else noise)
    return model.eval()


def build(cls, cfg, seed: int = 0, attn: str = "sdpa", norm=lambda name: "norm.weight" in name.lower(),
          std: float = 0.2):
    """``cls`` (a transformers model class) from ``cfg`` with ``attn`` attention and every parameter redrawn from
    ``seed``: a wider spread than HF's init, norm weights (``norm(name)``) around 1, so nothing hides. Returns the
    model in eval mode and the generator, for parameters a test adds after."""
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation=attn)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1 + noise if norm(name) else noise)
    return model.eval(), g


def hf_hidden(model, ids, mask, kw):
    """transformers' ``last_hidden_state`` for a padded batch (``kw``: position and type ids)."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state


def make(family: str, shape: int, kind: str = "base", seed: int = 0, **extra):
    """A random-weight HF model: ``kind`` = "base", "seq" or "token"."""
    cfg_cls, base, seq, tok, shapes = ZOO[family]
    cfg = cfg_cls(vocab_size=VOCAB, **{**shapes[shape], **extra})  # extra overrides the shape's settings
    cls = {"base": base, "seq": seq, "token": tok}[kind]
    torch.manual_seed(seed)
    return randomize(cls(cfg), seed)


def type_vocab(model) -> int:
    return getattr(model.config, "type_vocab_size", 0) or 0


def batch(model, lengths, side: str, seed: int = 1):
    """Padded ``(input_ids, attention_mask, token_type_ids | None, hf_kwargs)`` with pads on ``side``.

    Real ids avoid the pad id (RoBERTa/MPNet number positions from it). ``hf_kwargs`` carries explicit
    per-sequence ``position_ids`` (0 at each sequence's first real token, plus the family's offset), which HF
    needs for left padding: by default it numbers positions from column 0.
    """
    g = torch.Generator().manual_seed(seed)
    B, S = len(lengths), max(lengths)
    pad = model.config.pad_token_id or 0
    ids = torch.full((B, S), pad, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    n_types = type_vocab(model)
    types = torch.zeros(B, S, dtype=torch.long) if n_types > 1 else None
    for b, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(S - n, S)
        ids[b, cols] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[b, cols] = 1
        if types is not None:
            types[b, cols] = torch.randint(0, n_types, (n,), generator=g)
    offset = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "mpnet": 2}.get(model.config.model_type, 0)
    kw = {"position_ids": (mask.cumsum(1) - 1).clamp(min=0) + offset}
    if types is not None:
        kw["token_type_ids"] = types
    return ids, mask, types, kw


LENGTHS = [5, MAX_LEN, 1, 17, 2, 9]


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    d = (a.float() - b.float()).abs()
    return float(d[mask.bool()].max() if mask is not None else d.max())


# bf16 rule (as in test_parity): padfree bf16's error against HF fp32 at most twice HF's own bf16 error against
# HF fp32, plus BF16_ATOL for the few ops whose bf16 rounding differs in place (fused epilogues, LayerNorm input).
BF16_ATOL = 0.02


def bf16_errors(model, call, mask=None) -> tuple[float, float]:
    """``(padfree's error, transformers' own bf16 error)``, both against transformers in fp32: ``call(m)`` runs
    an HF model ``m`` and returns the tensor compared, ``call(None)`` runs padfree in bf16."""
    import copy
    with torch.no_grad():
        ref = call(model)
        theirs = call(copy.deepcopy(model).to(torch.bfloat16))
    return max_diff(call(None), ref, mask), max_diff(theirs, ref, mask)


def check_hidden_fp32(model, lengths, tol: float, enc=None, run=None, rotary: bool = False) -> list[tuple]:
    """padfree's last hidden state (``enc``, default: padfree's load of ``model``) against transformers' in fp32
    within ``tol``, with the pads on either side: zeros at the pads, and a batch that reads every token type of
    the family. ``run(ids, mask, kw)``: the reference (default: ``model``'s ``last_hidden_state``). With ``rotary``
    (positions enter through the rotation of Q and K only, so scores depend on distances alone): transformers'
    ``position_ids`` given to padfree are read as they are (no offset), and transformers' default numbering (from
    column 0, without ``position_ids``) gives the same states. Returns ``(ids, mask, types, kw, reference)`` per
    side."""
    import padfree
    enc = padfree.from_pretrained(model) if enc is None else enc
    run = (lambda ids, mask, kw: hf_hidden(model, ids, mask, kw)) if run is None else run
    used = []
    for side in ("right", "left"):
        ids, mask, types, kw = batch(model, lengths, side)
        ref = run(ids, mask, kw)
        out = enc(ids, mask, types).last_hidden_state
        assert out.shape == ref.shape
        err = max_diff(out, ref, mask)
        assert err <= tol, f"{side}: {err:.2e}"
        assert float(out[~mask.bool()].abs().max()) == 0.0, f"{side}: not zero at the pads"
        if types is not None:  # token types are read: the batch draws every one
            assert set(types[mask.bool()].tolist()) == set(range(type_vocab(model))), side
        if rotary:
            with_positions = enc(ids, mask, types, kw["position_ids"]).last_hidden_state
            assert max_diff(with_positions, ref, mask) <= tol, f"{side}: transformers' position_ids"
            default = run(ids, mask, {k: v for k, v in kw.items() if k != "position_ids"})
            assert max_diff(out, default, mask) <= tol, f"{side}: transformers' default positions"
        used.append((ids, mask, types, kw, ref))
    return used


def check_hidden_bf16(model, lengths, side: str = "left", enc=None, run=None) -> None:
    """padfree's bf16 last hidden state (``enc``, default: padfree's bf16 load of ``model``) against transformers
    in fp32, by the bf16 rule (pads on ``side``). ``run(m, ids, mask, kw)``: the reference of an HF model ``m``
    (default: its ``last_hidden_state``)."""
    import padfree
    enc = padfree.from_pretrained(model, dtype=torch.bfloat16) if enc is None else enc
    run = hf_hidden if run is None else run
    ids, mask, types, kw = batch(model, lengths, side)
    ours, theirs = bf16_errors(model, lambda m: enc(ids, mask, types).last_hidden_state if m is None
                               else run(m, ids, mask, kw), mask)
    assert ours <= 2 * theirs + BF16_ATOL, f"bf16: {ours:.3f} vs transformers' own bf16 {theirs:.3f}"


def check_sequence_classifier(model, lengths, pooling: str | None, tol: float, path=None) -> None:
    """padfree's ``SequenceClassifier`` of an HF classification ``model`` against the model itself, under right
    padding (HF's first-token pooling reads column 0): fp32 within ``tol``, bf16 by the bf16 rule; left padding
    gives the same logits (padfree pools each sequence's own first token, or its own mean); with ``path``, the
    model saved there loads as the one in memory does."""
    import padfree
    clf = padfree.SequenceClassifier.from_pretrained(model)
    ids, mask, types, kw = batch(model, lengths, "right")

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=mask, **kw).logits
    ref = logits(model)
    err = max_diff(clf(ids, mask, types).logits, ref)
    assert err <= tol, f"{pooling}: {err:.2e}"
    ids_l, mask_l, types_l, _ = batch(model, lengths, "left")
    err = max_diff(clf(ids_l, mask_l, types_l).logits, ref)
    assert err <= tol, f"{pooling} left: {err:.2e}"
    clf16 = padfree.SequenceClassifier.from_pretrained(model, dtype=torch.bfloat16)
    ours, theirs = bf16_errors(model, lambda m: clf16(ids, mask, types).logits if m is None else logits(m))
    assert ours <= 2 * theirs + BF16_ATOL, f"bf16 {pooling}: {ours:.3f} vs {theirs:.3f}"
    if path is not None:
        model.save_pretrained(path)
        err = max_diff(padfree.SequenceClassifier.from_pretrained(path)(ids, mask, types).logits, ref)
        assert err <= tol, f"{pooling} from {path}: {err:.2e}"


def check_token_classifier(model, lengths, tol: float) -> None:
    """padfree's ``TokenClassifier`` of an HF token-classification ``model`` against the model itself on every
    real token, with the pads on either side: fp32 within ``tol``, bf16 by the bf16 rule."""
    import padfree
    clf = padfree.TokenClassifier.from_pretrained(model)
    clf16 = padfree.TokenClassifier.from_pretrained(model, dtype=torch.bfloat16)
    for side in ("right", "left"):
        ids, mask, types, kw = batch(model, lengths, side)

        def logits(m):
            with torch.no_grad():
                return m(input_ids=ids, attention_mask=mask, **kw).logits
        ours = clf(ids, mask, types).logits
        ref = logits(model)
        assert ours.shape == ref.shape
        err = max_diff(ours, ref, mask)
        assert err <= tol, f"{side}: {err:.2e}"
        ours16, theirs16 = bf16_errors(model, lambda m: clf16(ids, mask, types).logits if m is None else logits(m),
                                       mask)
        assert ours16 <= 2 * theirs16 + BF16_ATOL, f"bf16 {side}: {ours16:.3f} vs {theirs16:.3f}"


def check_cross_encoder(model, path, tol: float) -> None:
    """A one-label classification ``model`` saved with a WordPiece tokenizer: padfree's ``CrossEncoder`` scores
    query-passage pairs as sentence-transformers' does, within ``tol``."""
    import numpy as np
    from sentence_transformers import CrossEncoder as STCrossEncoder

    import padfree
    from test_heads import TEXTS, save_with_tokenizer
    save_with_tokenizer(model, path)
    pairs = [("query", p) for p in TEXTS] + [("python code", p) for p in TEXTS[:2]]
    ref = STCrossEncoder(str(path), device="cpu").predict(pairs, convert_to_numpy=True)
    assert np.abs(padfree.CrossEncoder.from_pretrained(path).score(pairs) - ref).max() <= tol


def check_saved_directory(make_model, path, tol: float) -> None:
    """A model saved with a BPE tokenizer (``make_model(vocab_size)``: the random-weight HF model): padfree loads the
    directory exactly as the model in memory, and ``SentenceEncoder`` of it (mean pooling, as sentence-transformers
    builds it) matches sentence-transformers within ``tol``."""
    import padfree
    from sentence_transformers import SentenceTransformer
    from test_tokenizer import bpe_tokenizer
    tok = bpe_tokenizer()
    model = make_model(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    ids, mask, _, _ = batch(model, [3, 11, 1], "right")
    enc_dir, enc_mem = padfree.from_pretrained(path), padfree.from_pretrained(model)
    assert max_diff(enc_dir(ids, mask).last_hidden_state, enc_mem(ids, mask).last_hidden_state) == 0
    texts = ["the cat on the mat", "a", "then the dog sat on the cat near the door of the house"]
    ours = padfree.SentenceEncoder.from_pretrained(path).encode(texts)
    theirs = SentenceTransformer(str(path), device="cpu").encode(texts)
    assert abs(ours - theirs).max() <= tol


# ---------------------------------------------------------------------------------- families outside ZOO's mould
@dataclass(frozen=True)
class Family:
    """A family ZOO's tuple does not hold: special token ids in its config, a masked-LM kind, its own names for
    norm weights, its own parity batch (1 token to its longest), and the padfree config fields each shape must
    give. Built by :func:`build_family`; test_families.py runs the checks every family shares, its own test file
    what only it has."""
    config: type  # transformers config class
    classes: dict  # kind ("base", "seq", "token", "mlm") -> transformers model class
    shapes: tuple  # (shape 0, shape 1): config kwargs
    lengths: list  # the parity batch
    special: dict = field(default_factory=dict)  # token ids the config takes
    norm: Callable[[str], bool] = lambda name: "norm.weight" in name.lower()  # parameters drawn around 1
    expect: tuple = ({}, {})  # padfree config fields of each shape
    head: tuple = ({}, {})  # task-head config of each shape's classifiers
    poolings: tuple = (None,)  # classifier_pooling values of its sequence classifiers (None: a single head)
    plant: str = "embeddings"  # the base-model module where a test plants a weight padfree does not use


FAMILIES = {
    "eurobert": Family(
        t.EuroBertConfig, dict(base=t.EuroBertModel, seq=t.EuroBertForSequenceClassification,
                               token=t.EuroBertForTokenClassification, mlm=t.EuroBertForMaskedLM), (
            # transformers' defaults: no biases, SiLU, rope_theta 10000, eps 1e-5
            dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=3, intermediate_size=40,
                 max_position_embeddings=128),
            # every bias on, another RoPE base and eps, four heads of 12
            dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
                 attention_bias=True, mlp_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                 rms_norm_eps=1e-6, max_position_embeddings=128)),
        LENGTHS + [100, 63], dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, mask_token_id=3),
        norm=lambda name: "norm" in name, expect=({"rotary_theta": 10000.0}, {"rotary_theta": 500.0}),
        poolings=("bos", "mean"), plant="layers.1"),
    "modernbert": Family(
        t.ModernBertConfig, dict(base=t.ModernBertModel, seq=t.ModernBertForSequenceClassification,
                                 token=t.ModernBertForTokenClassification, mlm=t.ModernBertForMaskedLM), (
            # layers 0, 3 global; 1, 2 local with |i - j| <= 4; no biases anywhere (ModernBERT's defaults)
            dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=4, intermediate_size=40, local_attention=8,
                 max_position_embeddings=128),
            # layers 0, 2 global; 1 local with |i - j| <= 8; every bias on, other RoPE bases, tanh GELU, eps 1e-6
            dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=3, intermediate_size=64, local_attention=16,
                 global_attn_every_n_layers=2, global_rope_theta=1000.0, local_rope_theta=300.0, norm_bias=True,
                 attention_bias=True, mlp_bias=True, hidden_activation="gelu_pytorch_tanh", norm_eps=1e-6,
                 max_position_embeddings=128)),
        LENGTHS, dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
        norm=lambda name: name.endswith("norm.weight"), expect=({"local_layers": (1, 2)}, {"local_layers": (1,)}),
        head=(dict(classifier_activation="gelu", classifier_bias=False),
              dict(classifier_activation="silu", classifier_bias=True)),
        poolings=("cls", "mean")),
    "nomic_bert": Family(
        t.NomicBertConfig, dict(base=t.NomicBertModel, seq=t.NomicBertForSequenceClassification,
                                token=t.NomicBertForTokenClassification), (
            dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=3, intermediate_size=40,
                 max_position_embeddings=128),
            dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, layer_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 300.0}, max_position_embeddings=256)),
        [5, 100, 1, 37, 2, 64, 17], dict(pad_token_id=1),
        expect=tuple({"rotary_theta": theta, "pre_norm": False, "type_vocab_size": 2} for theta in (1000.0, 300.0))),
    # its task adapters (LoRA) are test_jina_v3.py's: built there on top of build_family's model
    "jina_embeddings_v3": Family(
        t.JinaEmbeddingsV3Config, dict(base=t.JinaEmbeddingsV3Model, seq=t.JinaEmbeddingsV3ForSequenceClassification,
                                       token=t.JinaEmbeddingsV3ForTokenClassification), (
            dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=40,
                 max_position_embeddings=64, lora_rank=4, lora_alpha=1),
            dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, layer_norm_eps=1e-6,
                 hidden_act="gelu_new", type_vocab_size=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 500.0}, max_position_embeddings=64,
                 lora_rank=3, lora_alpha=2.0)),
        [5, 40, 1, 17, 2, 9, 33], dict(pad_token_id=1)),
}
# the families whose parity test_families.py runs; jina-v3's runs per task adapter in test_jina_v3.py
ROTARY = ["eurobert", "modernbert", "nomic_bert"]
ROTARY_CASES = [(f, s) for f in ROTARY for s in range(2)]


def build_family(family: str, shape: int, kind: str = "base", seed: int = 0, attn: str = "sdpa",
                 vocab: int | None = None, **extra):
    """A random-weight HF model of a :data:`FAMILIES` family (``extra`` overrides the shape's settings), and the
    generator that drew it (for parameters a test adds after)."""
    f = FAMILIES[family]
    cfg = f.config(vocab_size=vocab or VOCAB, **f.special, **{**f.shapes[shape], **extra})
    return build(f.classes[kind], cfg, seed, attn, f.norm)


def make_family(family: str, shape: int, kind: str = "base", seed: int = 0, attn: str = "sdpa",
                vocab: int | None = None, **extra):
    return build_family(family, shape, kind, seed, attn, vocab, **extra)[0]


def config_dict(family: str, shape: int = 0, **extra) -> dict:
    """The config.json content of a :data:`FAMILIES` family's shape, ``extra`` written over it."""
    f = FAMILIES[family]
    cfg = f.config(vocab_size=VOCAB, **f.special, **f.shapes[shape]).to_dict()
    cfg.update(extra)
    return cfg


def config_dir(family: str, path, **extra):
    """A directory holding only shape 0's config.json (``extra`` written over it): a config error must come
    before any weight is read."""
    import json
    (path / "config.json").write_text(json.dumps(config_dict(family, 0, **extra)))
    return path
