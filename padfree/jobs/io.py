"""Reading a job's input (Parquet, JSONL, CSV; a file or a directory of them) as a stream of pyarrow record
batches, with the checks that make a bad input a one-line error before any work: a missing file or column
(naming the columns that exist), a column that is not text, an unreadable file, no rows."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
           ".csv": "csv"}
READ_ROWS = 4096  # rows per record batch read from a Parquet file
# JSONL / CSV are read in blocks and their column types are inferred from the first block: one block of up to
# 64 MiB (the whole file, for most) keeps a column that holds ints first and a float later one float column
TEXT_BLOCK = 64 << 20


def input_files(path, fmt: str | None = None) -> tuple[list[Path], str]:
    """The files of ``path`` (itself, or the files of a directory sorted by name) and their format."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"input {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
        if fmt is None:
            files = [p for p in files if p.suffix.lower() in FORMATS]
        if not files:
            raise ValueError(f"input directory {str(path)!r} has no {fmt or 'Parquet, JSONL or CSV'} files")
    else:
        files = [path]
    if fmt is None:
        kinds = {FORMATS.get(p.suffix.lower()) for p in files}
        if None in kinds:
            raise ValueError(f"cannot tell the format of {str(files[0])!r} from its suffix; pass --format "
                             f"({', '.join(sorted(set(FORMATS.values())))})")
        if len(kinds) > 1:
            raise ValueError(f"input directory {str(path)!r} mixes formats {sorted(kinds)}; give one kind")
        fmt = kinds.pop()
    if fmt not in set(FORMATS.values()):
        raise ValueError(f"unknown format {fmt!r}; choose from {sorted(set(FORMATS.values()))}")
    return files, fmt


def identity(files: list[Path]) -> list[dict]:
    """What identifies the input for resuming: each file's absolute path, size and modification time."""
    out = []
    for f in files:
        st = f.stat()
        out.append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _open(file: Path, fmt: str, text_columns: list[str]) -> Iterator[pa.RecordBatch]:
    if fmt == "parquet":
        return pq.ParquetFile(file).iter_batches(batch_size=READ_ROWS)
    block = max(1 << 20, min(TEXT_BLOCK, file.stat().st_size + 1))
    if fmt == "csv":  # text columns stay text even when they hold numbers; quoted values may span lines
        convert = pcsv.ConvertOptions(column_types={c: pa.string() for c in text_columns}, strings_can_be_null=True)
        return iter(pcsv.open_csv(file, read_options=pcsv.ReadOptions(block_size=block),
                                  parse_options=pcsv.ParseOptions(newlines_in_values=True), convert_options=convert))
    return iter(pjson.open_json(file, read_options=pjson.ReadOptions(block_size=block)))


def check_schema(schema: pa.Schema, file: Path, text_columns: list[str], other_columns: list[str]) -> None:
    missing = [c for c in text_columns + other_columns if c not in schema.names]
    if missing:
        raise ValueError(f"{str(file)!r} has no column {', '.join(map(repr, missing))}; its columns are "
                         f"{schema.names}")
    for c in text_columns:
        t = schema.field(c).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
                or pa.types.is_null(t)):
            raise ValueError(f"column {c!r} of {str(file)!r} holds {t}, not text")


def read_batches(files: list[Path], fmt: str, text_columns: list[str], other_columns: list[str]
                 ) -> Iterator[pa.RecordBatch]:
    """Record batches of the wanted columns, file after file, in order; ``ValueError`` for a file that cannot
    be read or lacks a column, and for an input with no rows at all."""
    columns = list(dict.fromkeys(text_columns + other_columns))
    rows = 0
    for f in files:
        try:
            reader = _open(f, fmt, text_columns)
            checked = False
            for batch in reader:
                if not checked:
                    check_schema(batch.schema, f, text_columns, other_columns)
                    checked = True
                rows += batch.num_rows
                yield batch.select(columns)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"cannot read {str(f)!r} as {fmt}: {str(e).splitlines()[0]}") from None
    if rows == 0:
        raise ValueError(f"the input has no rows ({len(files)} file{'s' if len(files) > 1 else ''})")


def check_files(files: list[Path], fmt: str, text_columns: list[str], other_columns: list[str]) -> None:
    """Check every file's columns before any model is loaded or any shard written (Parquet: from its footer;
    JSONL / CSV: from its first block), so that a bad file late in a directory fails the job at once."""
    for f in files:
        try:
            if fmt == "parquet":
                schema = pq.read_schema(f)
            else:
                batch = next(_open(f, fmt, text_columns), None)
                if batch is None:
                    continue
                schema = batch.schema
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"cannot read {str(f)!r} as {fmt}: {str(e).splitlines()[0]}") from None
        check_schema(schema, f, text_columns, other_columns)


def vectors(rows: np.ndarray, width: int) -> pa.FixedSizeListArray:
    """``rows [n, width]`` as one ``fixed_size_list<T>[width]`` column, T the rows' dtype (float32; int8 / uint8
    for quantized embeddings, the binary ones packed ``ceil(D/8)`` bytes wide)."""
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), pa.from_numpy_dtype(rows.dtype)), width)


def parquet_rows(files: list[Path], fmt: str) -> int | None:
    """Total rows when known without reading the data (Parquet footers), else None."""
    if fmt != "parquet":
        return None
    try:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except (pa.ArrowException, OSError):
        return None
