"""A batch job: embed or classify a whole input, streaming, into Parquet shards that make it resumable.

The input's rows are cut into shards of ``shard_rows`` consecutive rows; shard k becomes ``part-{k:05d}.parquet``,
written to a hidden temporary name and renamed, so a shard file exists only when it is complete. The directory's
``_manifest.json`` records the input's identity (paths, sizes, modification times) and every option that changes
the output; a run over a directory with another manifest refuses, naming what differs (``overwrite`` starts
again), and a rerun after a crash (even SIGKILL) skips the shards that exist. Memory holds one shard of rows;
inside a shard, texts are sorted by length, batched by the token budget through the pipeline (one packed forward
per batch) and put back in input order. Pyarrow and the dataset readers ignore names starting with "." or "_",
so ``pyarrow.parquet.read_table(out_dir)`` reads the rows back in input order.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..batching import positive_int
from ..cpu import dtype_name
from ..pipelines import Pipeline
from ..quantize import DTYPES, check_precision
from ..startup import open_pipeline, parse_dtype
from . import io

MANIFEST = "_manifest.json"
DEFAULT_BATCH_TOKENS = 4096  # real tokens per forward of a job: 4096 rather than 16384 (benchmarks/NOTES.md 23)
# options that change the output: a rerun with another value refuses (max_batch_tokens only changes speed)
# option -> how the command line says it, where that is not --option (the adapter is --task, as Jina names it)
_FLAGS = {"adapter": "--task", "kind": "the command (embed or classify)"}
OUTPUT_OPTIONS = ("kind", "model", "dtype", "column", "pair_column", "id_column", "keep", "skip_empty",
                  "shard_rows", "format")


@dataclass
class JobSpec:
    kind: str                       # "embed" or "classify"
    input: str
    output: str
    model: str
    column: str = "text"
    pair_column: str | None = None  # classify: the second text of each pair (cross-encoders)
    id_column: str | None = None
    keep: list[str] = field(default_factory=list)
    dtype: str = "auto"
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS
    format: str | None = None
    shard_rows: int = 10000
    skip_empty: bool = False
    overwrite: bool = False
    progress: bool = True
    adapter: str | None = None      # embed: the task adapter of a model with task LoRA adapters (jina-v3)
    revision: str | None = None     # where model is a Hub ID: its branch, tag or commit (None: the default branch)
    token: str | None = field(default=None, repr=False)  # the Hub token: passed to start-up, never in the manifest
    precision: str = "float32"      # embed: float32, int8, uint8, binary or ubinary (padfree.quantize)

    def options(self, fmt: str) -> dict:
        d = asdict(self)
        # a directory by its absolute path, a Hub ID as it is (with its revision where given)
        model = str(Path(self.model).resolve()) if Path(self.model).is_dir() else self.model
        # the dtype "auto" resolved on this machine: a job resumed where auto picks another is refused, not mixed
        d.update(model=model, format=fmt, dtype=dtype_name(parse_dtype(self.dtype)))
        # the adapter, the revision and a quantized precision only where given, so that the manifests of jobs
        # without them stay as they were
        return {k: d[k] for k in OUTPUT_OPTIONS + (("adapter",) if self.adapter else ())
                + (("revision",) if self.revision else ())
                + (("precision",) if self.precision != "float32" else ())}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _shard(out: Path, k: int) -> Path:
    return out / f"part-{k:05d}.parquet"


def prepare_output(spec: JobSpec, manifest: dict) -> dict | None:
    """Create or check the output directory. The previous manifest if it matches (a rerun), None if new;
    ValueError naming what differs."""
    out = Path(spec.output)
    old_file = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} exists and is not a directory")
    if out.exists() and spec.overwrite and old_file.is_file():  # only a padfree job's files are ever deleted
        for p in out.iterdir():
            if p.name == MANIFEST or (p.name.startswith(("part-", ".part-")) and p.suffix in (".parquet", ".tmp")):
                p.unlink()
    if old_file.is_file():
        old = json.loads(old_file.read_text())
        now, before = manifest["options"], old["options"]
        diffs = [f"{_FLAGS.get(k, '--' + k.replace('_', '-'))}: {before.get(k)!r} before, {now.get(k)!r} now"
                 for k in dict.fromkeys([*now, *before]) if before.get(k) != now.get(k)]
        if old["inputs"] != manifest["inputs"]:
            diffs.append("the input files changed (paths, sizes or modification times)")
        if diffs:
            raise ValueError(f"{str(out)!r} holds a job with other settings ({'; '.join(diffs)}); pass --overwrite "
                             "to start again, or choose another output directory")
        return old
    if out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise ValueError(f"output directory {str(out)!r} is not empty and holds no padfree job ({MANIFEST}); "
                         "choose an empty or new directory")
    return None


class _Rows:
    """Cuts the stream of record batches into shards of exactly ``n`` rows (the last may be shorter)."""

    def __init__(self, batches, n: int):
        self.batches, self.n = batches, n

    def __iter__(self):
        pending, size = [], 0
        for b in self.batches:
            while b.num_rows:
                take = min(self.n - size, b.num_rows)
                pending.append(b.slice(0, take))
                size += take
                b = b.slice(take)
                if size == self.n:
                    yield pa.Table.from_batches(pending)
                    pending, size = [], 0
        if size:
            yield pa.Table.from_batches(pending)


def _texts(table: pa.Table, column: str) -> tuple[list[str], np.ndarray]:
    """The column as strings (null -> "") and a mask of the rows that were null or empty."""
    values = table.column(column).to_pylist()
    empty = np.array([not v for v in values], dtype=bool)
    return [v or "" for v in values], empty


def _columns(spec: JobSpec, table: pa.Table) -> dict[str, pa.Array]:
    cols = {}
    for name in ([spec.id_column] if spec.id_column else []) + spec.keep:
        cols[name] = table.column(name)
    return cols


def compute_shard(spec: JobSpec, pipeline: Pipeline, table: pa.Table) -> tuple[pa.Table, dict]:
    """One shard's output table and its counts (rows, tokens, skipped, at the length limit)."""
    texts, empty = _texts(table, spec.column)
    pairs = None
    if spec.pair_column:
        pairs, empty_pair = _texts(table, spec.pair_column)
        empty |= empty_pair
    if spec.skip_empty and empty.any():
        keep = np.flatnonzero(~empty)
        table = table.take(pa.array(keep))
        texts = [texts[i] for i in keep]
        pairs = None if pairs is None else [pairs[i] for i in keep]
    if pipeline.kind == "embed":
        options = pipeline.output_options(precision=spec.precision)
        seqs = pipeline.prepare(texts, truncate=True, adapter=spec.adapter, **options)
    else:
        seqs = pipeline.prepare(texts, pairs, truncate=True, output="probabilities")
    lengths = [len(s.ids) for s in seqs]
    counts = {"rows": len(seqs), "tokens": int(sum(lengths)), "skipped": int(empty.sum()) if spec.skip_empty else 0,
              "empty": int(empty.sum()), "at_limit": sum(n >= pipeline.max_input_length for n in lengths)}
    cols = _columns(spec, table)
    width = pipeline.width(options) if pipeline.kind == "embed" else pipeline.num_labels
    rows = np.stack(pipeline.run_all(seqs, spec.max_batch_tokens, sort_all=True)) if seqs \
        else np.zeros((0, width), DTYPES[spec.precision])
    if pipeline.kind == "embed":
        cols["embedding"] = io.vectors(rows, width)
    else:
        best = rows.argmax(1) if len(rows) else np.zeros(0, int)
        cols["label"] = pa.array([pipeline.id2label[i] for i in best], pa.string())
        cols["score"] = pa.array(rows[np.arange(len(best)), best], pa.float32())
        cols["scores"] = io.vectors(rows, width)
    return pa.table(cols), counts


def check_spec(spec: JobSpec) -> None:
    """``ValueError`` naming the first option of ``spec`` that is wrong on its own (before any file is read)."""
    for name in ("shard_rows", "max_batch_tokens"):
        positive_int(f"--{name.replace('_', '-')}", getattr(spec, name))
    if spec.kind == "embed" and spec.pair_column:
        raise ValueError("--pair-column is for classify (cross-encoders)")
    if spec.kind != "embed" and spec.adapter:
        raise ValueError("--task (a task adapter) is for embed")
    if spec.kind != "embed" and spec.precision != "float32":
        raise ValueError("--precision (quantized embeddings) is for embed")
    check_precision(spec.precision)
    parse_dtype(spec.dtype)


def input_columns(spec: JobSpec) -> tuple[list[str], list[str]]:
    """(the text columns, the other columns carried to the output) a job reads."""
    text = [spec.column] + ([spec.pair_column] if spec.pair_column else [])
    return text, list(dict.fromkeys(([spec.id_column] if spec.id_column else []) + spec.keep))


def _check_carried(spec: JobSpec) -> None:
    """``ValueError`` where a carried column has the name of an output column."""
    produced = ("embedding",) if spec.kind == "embed" else ("label", "score", "scores")
    clash = [c for c in ([spec.id_column] if spec.id_column else []) + spec.keep if c in produced]
    if clash:
        raise ValueError(f"--id-column/--keep {clash} would be overwritten by the output column of the same name "
                         f"({', '.join(produced)})")


def run_job(spec: JobSpec) -> dict:
    """Run (or resume) a job; returns its summary. ValueError for bad input or a mismatched output."""
    check_spec(spec)
    _check_carried(spec)
    files, fmt = io.input_files(spec.input, spec.format)
    text_cols, other = input_columns(spec)
    io.check_files(files, fmt, text_cols, other)
    manifest = {"version": 1, "inputs": io.identity(files), "options": spec.options(fmt), "complete": False}
    old = prepare_output(spec, manifest)
    out = Path(spec.output)
    if old is not None and old.get("complete"):
        shards = old.get("shards", 0)
        if all(_shard(out, k).is_file() for k in range(shards)):
            _say(f"padfree {spec.kind}: {out} is complete ({old.get('rows', '?')} rows in {shards} shards): "
                 "nothing to do")
            return {**old.get("summary", {}), "nothing_to_do": True}
    pipeline = open_pipeline(spec.model, spec.dtype, spec.kind, spec.adapter, warm=False, revision=spec.revision,
                             token=spec.token)
    summary = _write_shards(spec, pipeline, _Rows(io.read_batches(files, fmt, text_cols, other), spec.shard_rows),
                            io.parquet_rows(files, fmt), manifest if old is None else None)
    out.mkdir(parents=True, exist_ok=True)
    manifest.update(complete=True, shards=summary["shards"], rows=summary["rows"], summary=summary)
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    _say(f"padfree {spec.kind}: {summary['rows']} rows, {summary['tokens']} tokens computed in "
         f"{summary['seconds']:.1f} s ({summary['shards']} shards, {summary['shards_done_before']} already done); "
         f"{summary['empty']} null or empty texts ({'skipped' if spec.skip_empty else 'embedded as empty'}), "
         f"{summary['at_limit']} at the model's length limit (longer ones cut) -> {out}")
    return summary


def _write_shards(spec: JobSpec, pipeline: Pipeline, tables, total_rows: int | None, new_manifest: dict | None
                  ) -> dict:
    """Each shard not yet in the output computed and written atomically (the manifest ``new_manifest``, for a new
    job, with the first); the summary's counts."""
    out = Path(spec.output)
    bar = None
    if spec.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_rows, unit="row", desc=f"padfree {spec.kind}", dynamic_ncols=True)
    summary = {"rows": 0, "tokens": 0, "skipped": 0, "empty": 0, "at_limit": 0, "shards_done_before": 0,
               "shards": 0}
    t0 = time.perf_counter()
    computed_tokens = 0
    for k, table in enumerate(tables):
        summary["shards"] = k + 1
        path = _shard(out, k)
        if path.is_file():
            summary["shards_done_before"] += 1
            summary["rows"] += pq.ParquetFile(path).metadata.num_rows
        else:
            result, counts = compute_shard(spec, pipeline, table)
            if new_manifest is not None and not (out / MANIFEST).is_file():  # the directory comes with shard 1
                out.mkdir(parents=True, exist_ok=True)
                write_atomic(out / MANIFEST, json.dumps(new_manifest, indent=1).encode())
            tmp = path.with_name(f".{path.name}.tmp")
            pq.write_table(result, tmp)
            os.replace(tmp, path)
            for key in ("rows", "tokens", "skipped", "empty", "at_limit"):
                summary[key] += counts[key]
            computed_tokens += counts["tokens"]
        if bar is not None:
            bar.update(table.num_rows)
            dt = time.perf_counter() - t0
            bar.set_postfix_str(f"{computed_tokens / dt:,.0f} tokens/s" if dt > 0 else "")
    if bar is not None:
        bar.close()
    summary["seconds"] = time.perf_counter() - t0
    return summary
