"""Random-weight Hugging Face models of every padfree family, two shapes each, and helpers to compare.

Shapes are tiny (CPU, shared machine). Weights are redrawn with a larger spread than HF's init (std 0.02)
so that attention is far from uniform and a wrong mapping cannot hide.
"""
from __future__ import annotations

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


def check_hidden_bf16(model, lengths, side: str = "left") -> None:
    """padfree's bf16 last hidden state against transformers in fp32, by the bf16 rule (pads on ``side``)."""
    import padfree
    enc = padfree.from_pretrained(model, dtype=torch.bfloat16)
    ids, mask, types, kw = batch(model, lengths, side)
    ours, theirs = bf16_errors(model, lambda m: enc(ids, mask, types).last_hidden_state if m is None
                               else hf_hidden(m, ids, mask, kw), mask)
    assert ours <= 2 * theirs + BF16_ATOL, f"bf16: {ours:.3f} vs transformers' own bf16 {theirs:.3f}"


def check_sequence_classifier(model, lengths, pooling: str, tol: float) -> None:
    """padfree's ``SequenceClassifier`` of an HF classification ``model`` against the model itself, under right
    padding (HF's first-token pooling reads column 0): fp32 within ``tol``, bf16 by the bf16 rule; with mean
    pooling, left padding must give the same logits."""
    import padfree
    clf = padfree.SequenceClassifier.from_pretrained(model)
    ids, mask, _, kw = batch(model, lengths, "right")

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=mask, **kw).logits
    ref = logits(model)
    err = max_diff(clf(ids, mask).logits, ref)
    assert err <= tol, f"{pooling}: {err:.2e}"
    if pooling == "mean":  # mean pooling is side-independent
        ids_l, mask_l, _, _ = batch(model, lengths, "left")
        assert max_diff(clf(ids_l, mask_l).logits, ref) <= tol
    clf16 = padfree.SequenceClassifier.from_pretrained(model, dtype=torch.bfloat16)
    ours, theirs = bf16_errors(model, lambda m: clf16(ids, mask).logits if m is None else logits(m))
    assert ours <= 2 * theirs + BF16_ATOL, f"bf16 {pooling}: {ours:.3f} vs {theirs:.3f}"


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
