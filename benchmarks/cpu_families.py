"""Quick CPU check that packing carries over to other families: padfree (packed) vs transformers (padded to
the longest sequence), random weights at base shapes (BERT-, DistilBERT-, MPNet-, ALBERT-, DeBERTa-v3-base).

Usage: python benchmarks/cpu_families.py [--threads N] [--sequences N] [--reps N] [--markdown PATH]
A stand-in until ``padfree bench`` has W1 entries for these families. The two implementations run
interleaved (HF, padfree, HF, padfree, ...) so both see the same background load; median of ``reps``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import transformers as t

import padfree

V = 30522  # vocabulary size does not change the encoder's cost; a BERT-sized table keeps memory small
BASE = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=12, vocab_size=V)


def models() -> dict:
    return {
        "bert-base": t.BertModel(t.BertConfig(**BASE), add_pooling_layer=False),
        "distilbert-base": t.DistilBertModel(t.DistilBertConfig(vocab_size=V)),
        "mpnet-base": t.MPNetModel(t.MPNetConfig(**BASE, max_position_embeddings=514), add_pooling_layer=False),
        "albert-base": t.AlbertModel(t.AlbertConfig(embedding_size=128, **BASE), add_pooling_layer=False),
        "deberta-v3-base": t.DebertaV2Model(t.DebertaV2Config(
            **BASE, relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=True, position_buckets=256,
            norm_rel_ebd="layer_norm", position_biased_input=False, max_relative_positions=-1, layer_norm_eps=1e-7)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--markdown")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, args.max_len + 1, (args.sequences,), generator=g).tolist()
    B, S = len(lengths), max(lengths)
    mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()  # [B, S], right padding
    ids = torch.randint(3, V, (B, S), generator=g) * mask
    head = (f"{B} sequences, lengths 8..{args.max_len} uniform, {sum(lengths)} real tokens, {B * S} padded "
            f"({1 - sum(lengths) / (B * S):.0%} padding); fp32, {args.threads} threads, {platform.processor() or 'cpu'}, "
            f"load average at start {os.getloadavg()[0]:.1f}")
    rows = []
    print(head)
    for name, model in models().items():
        model.eval()
        enc = padfree.from_pretrained(model)
        hf, pf = (lambda: model(input_ids=ids, attention_mask=mask)), (lambda: enc(ids, mask))
        with torch.inference_mode():
            hf(), pf()  # warm-up
            a, b = [], []
            for _ in range(args.reps):
                t0 = time.perf_counter(); hf(); a.append(time.perf_counter() - t0)  # noqa: E702
                t0 = time.perf_counter(); pf(); b.append(time.perf_counter() - t0)  # noqa: E702
        th, tp = statistics.median(a) * 1e3, statistics.median(b) * 1e3
        rows.append((name, th, tp, th / tp))
        print(f"{name}: transformers padded {th:.0f} ms, padfree {tp:.0f} ms, speedup {th / tp:.2f}x", flush=True)
    if args.markdown:
        lines = [f"# CPU, families: padfree vs transformers (padded)\n", head + "\n",
                 "| model | transformers padded (ms) | padfree (ms) | speedup |", "|---|---|---|---|"]
        lines += [f"| {n} | {a:.0f} | {b:.0f} | {s:.2f}x |" for n, a, b, s in rows]
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
