"""Ray Data: a padfree pipeline as a ``map_batches`` callable class, and ``padfree embed/classify --ray``.

Each actor of the pool loads the model once (``__init__``); each call gets one pyarrow block of rows and runs
:func:`padfree.jobs.runner.compute_shard` on it (sorted by length inside, token-budget batches, one packed forward
per batch, rows back in the block's order), so the output columns and types are those of the local job.

No retry logic of ours; Ray's is used as is:
- an exception inside ``__call__`` fails the task, which Ray Data retries on another actor
  (``DataContext.get_current().actor_task_retry_on_errors``, off by default: a bad input fails the job at once);
- an actor that dies (OOM-killed, node lost) is restarted and its tasks resubmitted: Ray Data starts its pool
  actors with ``max_restarts=-1`` and ``max_task_retries=-1`` unless ``ray_remote_args`` say otherwise;
- a read or write task that fails is retried by Ray (its ``max_retries``; I/O errors listed in
  ``DataContext.retried_io_errors``).
A crashed *driver* (the ``padfree embed --ray`` process, or the head node) stops the job. :func:`run_job` resumes
it by its id column: the output directory holds the local job's manifest (input identity and options, plus
``ray: true``); run the same command again and the rows whose id is in a readable output file are dropped before
the model (files cut short by the crash are deleted), the rest are computed and appended.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..batching import positive_int
from ..jobs.runner import (DEFAULT_BATCH_TOKENS, MANIFEST, JobSpec, check_spec, compute_shard, input_columns,
                           prepare_output, write_atomic)
from ..startup import open_pipeline


# Reads and writes take no CPU of Ray's: the actors hold a CPU each for the whole job, and with as many actors as
# CPUs a read or write task needing one would never be scheduled (the job would hang). They are light beside
# the model. For the same reason there is no select_columns (a separate task needing a CPU): the actors take
# their columns from the whole rows.
IO_REMOTE_ARGS = {"num_cpus": 0}


class _PipelineBatches:
    """Shared body of :class:`Embed` and :class:`Classify`."""

    kind = ""

    def __init__(self, model: str, column: str = "text", id_column: str | None = None, keep=(),
                 dtype: str = "auto", max_batch_tokens: int = DEFAULT_BATCH_TOKENS, skip_empty: bool = False,
                 pair_column: str | None = None, adapter: str | None = None, done_ids: pa.Array | None = None,
                 revision: str | None = None, token: str | None = None, precision: str = "float32"):
        self.spec = JobSpec(kind=self.kind, input="", output="", model=str(model), column=column,
                            pair_column=pair_column, id_column=id_column, keep=list(keep), dtype=dtype,
                            max_batch_tokens=max_batch_tokens, skip_empty=skip_empty, progress=False,
                            adapter=adapter, revision=revision, token=token, precision=precision)
        check_spec(self.spec)
        self.pipeline = open_pipeline(model, dtype, self.kind, adapter, warm=False, revision=revision, token=token)
        if done_ids is not None and not id_column:
            raise ValueError("done_ids needs the id_column they are ids of")
        self.done = done_ids

    def __call__(self, batch: pa.Table) -> pa.Table:
        """[rows] in -> [rows] out (fewer with ``skip_empty``, or with ``done_ids``: the rows whose id is one of
        them are left out, as done by an earlier run): id/keep columns, then the result columns."""
        if self.done is not None and len(self.done):
            import pyarrow.compute as pc
            ids = batch.column(self.spec.id_column)
            batch = batch.filter(pc.invert(pc.is_in(ids, value_set=self.done.cast(ids.type))))
        table, _ = compute_shard(self.spec, self.pipeline, batch)
        return table


class Embed(_PipelineBatches):
    """``ds.map_batches(Embed, fn_constructor_kwargs={"model": path}, batch_format="pyarrow",
    compute=ray.data.ActorPoolStrategy(size=N))``: adds ``embedding`` (fixed_size_list<float32>[D], or int8 /
    uint8 with a quantized ``precision``). Keyword
    arguments: those of the local job (:class:`padfree.jobs.JobSpec`), and ``done_ids`` (ids of ``id_column``
    to leave out)."""
    kind = "embed"


class Classify(_PipelineBatches):
    """As :class:`Embed`; adds ``label`` (string), ``score`` (float32) and ``scores`` (fixed_size_list)."""
    kind = "classify"


def _read(files: list[Path], fmt: str, text_columns: list[str], columns: list[str]):
    import pyarrow.csv as pcsv
    import ray.data

    paths = [str(f) for f in files]
    args = dict(num_cpus=0)  # see IO_REMOTE_ARGS
    if fmt == "parquet":
        return ray.data.read_parquet(paths, **args)
    if fmt == "csv":  # text columns stay text even when they hold numbers, as in the local job
        convert = pcsv.ConvertOptions(column_types={c: pa.string() for c in text_columns},
                                      strings_can_be_null=True)
        return ray.data.read_csv(paths, convert_options=convert, **args)
    return ray.data.read_json(paths, lines=True, **args)


def _resume(spec: JobSpec, manifest: dict, out: Path) -> tuple[bool, pa.Array | None]:
    """Check or create the output directory as the local job does (its manifest, with ``ray: true``). Returns
    (whether the job is complete, the ids already in the output: None for a new job); ValueError where the
    directory holds something else or a job with other settings."""
    if spec.overwrite and (out / MANIFEST).is_file():  # only a padfree job's files are ever deleted
        for p in out.glob("*.parquet"):
            p.unlink()
    old = prepare_output(spec, manifest)
    if old is None:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
        return False, None
    if old.get("complete"):
        return True, None
    if not spec.id_column:
        raise ValueError(f"{str(out)!r} holds an unfinished Ray job without --id-column: a Ray job resumes by its "
                         "ids; pass --overwrite to start again")
    done = []
    for p in sorted(out.glob("*.parquet")):
        try:
            done.append(pq.read_table(p, columns=[spec.id_column]).column(0))
        except (pa.ArrowException, OSError):  # cut short when the driver died: its rows are computed again
            p.unlink()
    return False, pa.chunked_array(done).combine_chunks() if done else pa.array([], pa.null())


def _rows(out: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("*.parquet"))


def run_job(spec: JobSpec, address: str | None = "local", actors: int = 1, actor_cpus: int = 1) -> dict:
    """``spec`` on a Ray cluster (``address``: an existing one, e.g. ``"auto"`` or ``"ray://head:10001"``;
    ``"local"``: start a new local one; None: Ray's default, ``RAY_ADDRESS`` or else a new local one). When Ray is
    already initialized in this process, that cluster is used. Writes Parquet files to ``spec.output``: with
    ``preserve_order`` each file's rows are in input order, but the files are not always (Ray names them by write
    task, numbered in dispatch order, which is not always the input's): join on ``spec.id_column``.
    ``spec.shard_rows`` is the rows of one ``map_batches`` call. Run again after the driver died, it resumes by
    ``spec.id_column`` (see the module's docstring); a finished job run again does nothing. Returns a summary
    (rows, rows done before, seconds)."""
    import ray
    import ray.data

    from ..jobs import io

    check_spec(spec)
    positive_int("--ray-actors", actors)
    positive_int("--ray-actor-cpus", actor_cpus)
    files, fmt = io.input_files(spec.input, spec.format)
    text_cols, other = input_columns(spec)
    columns = list(dict.fromkeys(text_cols + other))
    io.check_files(files, fmt, text_cols, columns[len(text_cols):])
    out = Path(spec.output)
    manifest = {"version": 1, "inputs": io.identity(files), "options": {**spec.options(fmt), "ray": True},
                "complete": False}
    complete, done = _resume(spec, manifest, out)
    if complete:
        rows = _rows(out)
        print(f"padfree {spec.kind} --ray: {out} is complete ({rows} rows): nothing to do", file=sys.stderr,
              flush=True)
        return {"rows": rows, "rows_done_before": rows, "seconds": 0.0, "nothing_to_do": True}

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    # Ray 2.60's read_parquet lists files in a task asking 1 CPU that ray_remote_args do not reach: once the
    # actors hold every CPU it never runs and the job hangs (seen with 2 actors on 2 CPUs). The classic read
    # path is one read operator, to which num_cpus=0 applies.
    ctx.use_datasource_v2 = False
    ctx.execution_options.preserve_order = True  # blocks in input order; without it, even a file's rows are not
    ctx.enable_progress_bars = spec.progress
    cls = Embed if spec.kind == "embed" else Classify
    t0 = time.perf_counter()
    ds = _read(files, fmt, text_cols, columns).map_batches(
        cls, batch_format="pyarrow", batch_size=spec.shard_rows, zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=actor_cpus,
        fn_constructor_kwargs=dict(model=spec.model, column=spec.column, id_column=spec.id_column,
                                   keep=spec.keep, dtype=spec.dtype, max_batch_tokens=spec.max_batch_tokens,
                                   skip_empty=spec.skip_empty, pair_column=spec.pair_column,
                                   adapter=spec.adapter, done_ids=done, revision=spec.revision,
                                   token=spec.token, precision=spec.precision))
    before = 0 if done is None else len(done)  # the ids read from the kept files
    ds.write_parquet(str(out), ray_remote_args=IO_REMOTE_ARGS, mode=ray.data.SaveMode.APPEND)
    seconds = time.perf_counter() - t0
    rows = _rows(out)
    total = io.parquet_rows(files, fmt)  # known without reading for Parquet input
    if total is not None and (rows > total or (rows < total and not spec.skip_empty)):
        raise ValueError(f"the output holds {rows} rows for {total} input rows: the ids of --id-column "
                         f"{spec.id_column!r} are not unique, so a resumed job cannot tell rows apart; run it "
                         "again with --overwrite")
    manifest.update(complete=True, rows=rows)
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    print(f"padfree {spec.kind} --ray: {rows} rows ({before} done before) in {seconds:.1f} s with {actors} "
          f"actor(s) -> {out}", file=sys.stderr, flush=True)
    return {"rows": rows, "rows_done_before": before, "seconds": seconds}
