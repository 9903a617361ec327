"""``padfree embed`` and ``padfree classify``: a whole Parquet / JSONL / CSV input into Parquet shards,
resumable after a crash (run the same command again)."""
from __future__ import annotations

import argparse
import sys

from ..cpu import DTYPE_CHOICES
from ..quantize import PRECISIONS
from .runner import DEFAULT_BATCH_TOKENS


def parse_args(kind: str, argv):
    p = argparse.ArgumentParser(prog=f"padfree {kind}", description=__doc__)
    p.add_argument("input", help="a .parquet, .jsonl or .csv file, or a directory of them (read in name order)")
    p.add_argument("output", help="the output directory: part-NNNNN.parquet shards and _manifest.json")
    p.add_argument("--model", help="a sentence-transformers directory" + (" (default: the bundled all-MiniLM-L6-v2)"
                                                                       if kind == "embed" else
                                                                       " or *ForSequenceClassification / CrossEncoder "
                                                                       "directory") + ", or its Hugging Face Hub ID "
                   "(org/name: read from the Hugging Face cache, HF_HUB_CACHE, downloaded where missing unless "
                   "HF_HUB_OFFLINE=1)", required=kind != "embed")
    p.add_argument("--revision", help="with a Hub ID: its branch, tag or commit (default: the default branch); "
                   "recorded in the output's manifest")
    p.add_argument("--hf-token-file", metavar="FILE", help="with a Hub ID: a file holding the Hub token of a private "
                   "or gated model (default: HF_TOKEN or the huggingface-cli login); never written to the output")
    p.add_argument("--column", default="text", help="the text column (default: text)")
    if kind == "embed":
        p.add_argument("--task", dest="adapter", metavar="TASK",
                       help="the task adapter of a model with task LoRA adapters (jina-embeddings-v3: "
                            "retrieval.query, retrieval.passage, separation, classification, text-matching)")
        p.add_argument("--precision", choices=PRECISIONS, default="float32",
                       help="the embedding column's type (as sentence-transformers' quantize_embeddings): float32 "
                            "(default); int8 / uint8, each dimension in 256 steps between the vector's own min and "
                            "max; binary (int8) / ubinary (uint8), the bits x > 0 packed, ceil(D/8) bytes")
    if kind == "classify":
        p.add_argument("--pair-column", help="the second text of each pair (cross-encoders)")
    p.add_argument("--id-column", help="a column carried to the output first (e.g. a document id)")
    p.add_argument("--keep", default="", help="comma list of other columns carried to the output")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    p.add_argument("--max-batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                   help=f"real tokens per forward (default {DEFAULT_BATCH_TOKENS})")
    p.add_argument("--format", choices=["parquet", "jsonl", "csv"], help="override the format given by the suffix")
    p.add_argument("--shard-rows", type=int, default=10000, help="input rows per output shard (default 10000); "
                   "memory holds one shard")
    p.add_argument("--skip-empty", action="store_true", help="leave null and empty texts out of the output "
                   "(default: encode them as the empty string)")
    p.add_argument("--overwrite", action="store_true", help="start again in an output directory of another job")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on a Ray cluster (pip install 'padfree[ray]'): ADDRESS of one (e.g. auto, "
                        "ray://head:10001), or bare --ray to start a local one. Rows of --shard-rows go to one "
                        "actor call; the output is Parquet files (join them on --id-column: the files are not "
                        "always in input order); run again after a crash, it resumes by --id-column")
    p.add_argument("--ray-actors", type=int, default=1, metavar="N",
                   help="with --ray: actors of the pool, each holding the model (default 1; one per core with "
                        "--ray-actor-cpus 1 did best on a 2-core node: docs/scaling.md)")
    p.add_argument("--ray-actor-cpus", type=int, default=1, metavar="C",
                   help="with --ray: CPUs each actor holds, and its torch threads (default 1); actors x C may be "
                        "all of the cluster's CPUs")
    return p.parse_args(argv)


def main(kind: str, argv) -> None:
    args = parse_args(kind, argv)
    from .runner import JobSpec, run_job
    spec = JobSpec(kind=kind, input=args.input, output=args.output, model=args.model, revision=args.revision,
                   column=args.column,
                   pair_column=getattr(args, "pair_column", None), id_column=args.id_column,
                   keep=[c.strip() for c in args.keep.split(",") if c.strip()], dtype=args.dtype,
                   max_batch_tokens=args.max_batch_tokens, format=args.format, shard_rows=args.shard_rows,
                   skip_empty=args.skip_empty, overwrite=args.overwrite, progress=not args.no_progress,
                   adapter=getattr(args, "adapter", None), precision=getattr(args, "precision", "float32"))
    try:
        if args.hf_token_file is not None:
            from ..hub import read_secret
            spec.token = read_secret(args.hf_token_file)
        if spec.model is None:
            from ..startup import bundled_model_path
            spec.model = bundled_model_path()
        if args.ray is not None:
            try:
                from ..ray import run_job as run_on_ray
            except ImportError as e:
                raise ValueError(f"--ray needs Ray: pip install 'padfree[ray]' ({e})") from None
            run_on_ray(spec, args.ray, args.ray_actors, args.ray_actor_cpus)
        else:
            run_job(spec)
    except (ValueError, OSError) as e:
        print(f"padfree {kind}: error: {e}", file=sys.stderr)
        sys.exit(2)
