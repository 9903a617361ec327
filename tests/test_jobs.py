"""``padfree embed`` / ``padfree classify`` batch jobs, run as real subprocesses (``python -m padfree.cli``).

What they check, against the jobs contract:
- round trip of Parquet, JSONL and CSV inputs (and a directory of two Parquet files) into Parquet shards of
  ``--shard-rows`` rows plus ``_manifest.json``: ids and kept columns carried in order, the column layout
  (id, keep..., ``embedding`` as ``fixed_size_list<float32>[384]``), embeddings equal to
  ``SentenceEncoder.encode`` (1e-5) and to sentence-transformers (cosine >= 0.99999), a summary line;
- null / empty texts: embedded as the empty string, or left out (and counted) with ``--skip-empty``, including
  a shard whose rows are all left out;
- classify with a small random-weight BertForSequenceClassification, single texts and pairs, against
  transformers' softmax (label, score, scores);
- bad inputs (missing / non-text column, missing / empty / corrupted / truncated / unknown-suffix input, a
  directory holding a corrupted file): exit != 0, one line on stderr naming the problem, no traceback, no shard;
- a SIGKILLed job resumes (finished shards untouched) to the same rows as an uninterrupted run; a finished
  job reruns as "nothing to do"; other output-changing options refuse naming the option, ``--max-batch-tokens``
  does not; ``--overwrite`` redoes everything (and leaves no stale shards).
"""
from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from serving import classifier_dir, embedder_dir, kill_when, minilm_path

REPO = Path(__file__).resolve().parents[1]
DIM = 384
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}
SNIPPETS = ["hi", "OK", "a", "Hello, world!", 'He said "yes, fine", then left.', "naïve café déjà vu",
            "日本語のテキストです", "x = 1 + 2", "    leading and trailing spaces   ", "emoji 🙂 here"]


# ---------------------------------------------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=None)
def _paragraphs() -> tuple[str, ...]:
    from padfree.bench.corpus import stdlib_paragraphs
    return tuple(stdlib_paragraphs())


def spread(n: int, max_chars: int | None = None) -> list[str]:
    """``n`` real texts spread evenly over the stdlib docstring paragraphs (optionally short ones only)."""
    pool = [p for p in _paragraphs() if max_chars is None or len(p) <= max_chars]
    assert len(pool) >= n, (len(pool), n)
    step = len(pool) / n
    return [pool[int(i * step)] for i in range(n)]


def mixed_texts(n_real: int = 40) -> list[str]:
    """Real paragraphs with the short snippets interleaved (every 5th row a snippet)."""
    real, out = spread(n_real), []
    for i, s in enumerate(SNIPPETS):
        out.extend(real[4 * i: 4 * i + 4])
        out.append(s)
    out.extend(real[4 * len(SNIPPETS):])
    return out


@functools.lru_cache(maxsize=None)
def encoder():
    import padfree
    return padfree.SentenceEncoder.from_pretrained(minilm_path())


def encode(texts) -> np.ndarray:
    return np.asarray(encoder().encode(list(texts)), dtype=np.float32)


def cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "padfree.cli", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def cli_many(arg_lists, parallel: int = 2) -> list[subprocess.CompletedProcess]:
    """Several independent CLI runs, two at a time (process start-up is most of a small job)."""
    with ThreadPoolExecutor(parallel) as ex:
        return list(ex.map(lambda a: cli(*a), arg_lists))


def describe(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, describe(p)
    assert "Traceback" not in p.stderr, describe(p)
    return p


def shards(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"))


def read_out(out: Path) -> pa.Table:
    """The output as ``pq.read_table(out)``, checked equal to its shards read one by one in name order."""
    table = pq.read_table(out)
    by_shard = pa.concat_tables([pq.read_table(f) for f in shards(out)])
    assert table.num_rows == by_shard.num_rows
    assert table.column_names == by_shard.column_names
    for name in table.column_names:  # same order as the shards in name order
        assert table.column(name).to_pylist() == by_shard.column(name).to_pylist(), name
    return table


def embeddings(table: pa.Table, column: str = "embedding", dim: int = DIM) -> np.ndarray:
    t = table.schema.field(column).type
    assert pa.types.is_fixed_size_list(t) and t.list_size == dim and t.value_type == pa.float32(), t
    col = table.column(column).combine_chunks()
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)


def stats(out: Path) -> dict[str, tuple[int, int]]:
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in shards(out)}


def error_line(p: subprocess.CompletedProcess) -> str:
    """The one-line error of a failed run (asserts: exit != 0, no traceback, exactly one non-empty stderr line)."""
    assert p.returncode != 0, describe(p)
    assert "Traceback" not in p.stderr, describe(p)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line error:\n{describe(p)}"
    return lines[0]


def summary_line(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (p.stdout + "\n" + p.stderr).splitlines() if "rows" in ln and "tokens" in ln]
    assert lines, f"no summary line with 'rows' and 'tokens':\n{describe(p)}"
    return lines[-1]


def write_jsonl(path: Path, table: pa.Table) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in table.to_pylist():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_input(path: Path, table: pa.Table) -> Path:
    fmt = path.suffix.lstrip(".")
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "jsonl":
        write_jsonl(path, table)
    elif fmt == "csv":
        pcsv.write_csv(table, path)
    else:
        raise ValueError(fmt)
    return path


def base_table(texts: list[str], start_id: int = 1000) -> pa.Table:
    n = len(texts)
    return pa.table({"id": pa.array(range(start_id, start_id + n), pa.int64()),
                     "text": pa.array(texts, pa.string()),
                     "extra": pa.array([f"k{i}-{len(t)}" for i, t in enumerate(texts)], pa.string()),
                     "num": pa.array([i * 0.5 for i in range(n)], pa.float64()),
                     "other": pa.array([f"another text number {i}" for i in range(n)], pa.string())})


# ------------------------------------------------------------------------------------------------- round trip

ROUND_TRIP = ("parquet", "jsonl", "csv", "dir")
SHARD_ROWS = 16


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Every round-trip job run once (concurrently): name -> (input table, output dir, process)."""
    root = tmp_path_factory.mktemp("round_trip")
    texts = mixed_texts(40)
    table = base_table(texts)
    jobs, args = {}, []
    for name in ROUND_TRIP:
        if name == "dir":  # two files, written in reverse name order so that mtime order is not name order
            src = root / "in_dir"
            src.mkdir()
            cut = 21  # not a multiple of SHARD_ROWS: a shard spans both files
            write_input(src / "b-second.parquet", table.slice(cut))
            time.sleep(0.01)
            write_input(src / "a-first.parquet", table.slice(0, cut))
        else:
            src = write_input(root / f"input.{name}", table)
        out = root / f"out_{name}"
        jobs[name] = out
        args.append(["embed", src, out, "--id-column", "id", "--keep", "extra,num", "--shard-rows", SHARD_ROWS,
                     "--no-progress"])
    procs = cli_many(args)
    return {name: (table, jobs[name], p) for name, p in zip(ROUND_TRIP, procs)}


@pytest.fixture(scope="module")
def st_reference():
    """sentence-transformers' embeddings of the round-trip texts."""
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_path()), device="cpu")
    return np.asarray(model.encode(mixed_texts(40), batch_size=32), dtype=np.float32)


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip(round_trip, st_reference, name):
    table, out, p = round_trip[name]
    ok(p)
    summary_line(p)
    n = table.num_rows
    # shards of --shard-rows consecutive rows, the last shorter, and the manifest
    names = [f.name for f in shards(out)]
    n_shards = -(-n // SHARD_ROWS)
    assert names == [f"part-{i:05d}.parquet" for i in range(n_shards)]
    assert [pq.ParquetFile(out / f).metadata.num_rows for f in names] == \
        [SHARD_ROWS] * (n_shards - 1) + [n - SHARD_ROWS * (n_shards - 1)]
    assert (out / "_manifest.json").is_file()
    json.loads((out / "_manifest.json").read_text())
    assert not [f.name for f in out.iterdir() if f.name.startswith(".")], "temporary files left behind"

    got = read_out(out)
    assert got.column_names == ["id", "extra", "num", "embedding"]
    assert got.column("id").to_pylist() == table.column("id").to_pylist()
    assert got.column("extra").to_pylist() == table.column("extra").to_pylist()
    assert got.column("num").to_pylist() == table.column("num").to_pylist()
    # the dataset API reads the same rows in the same order
    import pyarrow.dataset as ds
    assert ds.dataset(out, format="parquet").to_table().column("id").to_pylist() == got.column("id").to_pylist()

    emb = embeddings(got)
    ref = encode(table.column("text").to_pylist())
    assert np.abs(emb - ref).max() <= 1e-5
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)  # normalized (all-MiniLM-L6-v2)
    cos = (emb * st_reference).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(st_reference, axis=1))
    assert cos.min() >= 0.99999, cos.min()


# -------------------------------------------------------------------------------------------- nulls / empties

def test_null_and_empty_texts(tmp_path):
    texts = spread(20, max_chars=300)
    empty_rows = {1, 4, 5, 6, 7, 13, 19}  # rows 4..7 fill a whole shard of --shard-rows 4
    vals = [None if i in (1, 5, 13) else "" if i in empty_rows else t for i, t in enumerate(texts)]
    table = pa.table({"id": pa.array(range(len(vals)), pa.int64()), "text": pa.array(vals, pa.string())})
    src_pq = write_input(tmp_path / "in.parquet", table)
    src_jl = write_input(tmp_path / "in.jsonl", table)
    common = ["--id-column", "id", "--shard-rows", 4, "--no-progress"]
    runs = {"pq": ["embed", src_pq, tmp_path / "pq", *common],
            "pq_skip": ["embed", src_pq, tmp_path / "pq_skip", *common, "--skip-empty"],
            "jl_skip": ["embed", src_jl, tmp_path / "jl_skip", *common, "--skip-empty"]}
    procs = dict(zip(runs, cli_many(runs.values())))
    empty_vec = encode([""])[0]
    kept = [i for i in range(len(vals)) if i not in empty_rows]
    ref_kept = encode([vals[i] for i in kept])
    for name, p in procs.items():
        ok(p)
        got = read_out(tmp_path / name)
        emb = embeddings(got)
        if name.endswith("skip"):
            assert got.column("id").to_pylist() == kept, name
            assert np.abs(emb - ref_kept).max() <= 1e-5, name
            counted = [ln for ln in (p.stdout + "\n" + p.stderr).splitlines()
                       if "skip" in ln.lower() and re.search(rf"\b{len(empty_rows)}\b", ln)]
            assert counted, f"{name}: the {len(empty_rows)} skipped rows are not counted:\n{describe(p)}"
        else:
            assert got.column("id").to_pylist() == list(range(len(vals))), name
            for i in empty_rows:
                assert np.abs(emb[i] - empty_vec).max() <= 1e-5, (name, i)
            assert np.abs(emb[kept] - ref_kept).max() <= 1e-5, name


# --------------------------------------------------------------------------------------------------- classify

def test_classify_single_and_pair(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers as t
    model = classifier_dir(tmp_path / "clf", num_labels=3, seed=0)
    texts = spread(24, max_chars=300) + ["short", "", "another snippet"]
    pairs = list(reversed(texts))
    table = base_table(texts).append_column("second", pa.array(pairs, pa.string()))
    src = write_input(tmp_path / "in.parquet", table)
    common = ["--model", model, "--id-column", "id", "--keep", "extra", "--shard-rows", 10, "--no-progress"]
    single, pair = cli_many([["classify", src, tmp_path / "single", *common],
                             ["classify", src, tmp_path / "pair", *common, "--pair-column", "second"]])

    tok = t.AutoTokenizer.from_pretrained(model)
    hf = t.AutoModelForSequenceClassification.from_pretrained(model).eval()
    id2label = hf.config.id2label
    for name, p, second in (("single", single, None), ("pair", pair, pairs)):
        ok(p)
        summary_line(p)
        enc = tok(texts, second, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(hf(**enc).logits.float(), -1).numpy()
        got = read_out(tmp_path / name)
        assert got.column_names == ["id", "extra", "label", "score", "scores"], name
        assert got.schema.field("label").type in (pa.string(), pa.large_string()), name
        assert got.schema.field("score").type == pa.float32(), name
        assert got.column("id").to_pylist() == table.column("id").to_pylist(), name
        assert got.column("extra").to_pylist() == table.column("extra").to_pylist(), name
        scores = embeddings(got, "scores", 3)
        assert np.abs(scores - probs).max() <= 1e-5, name
        top = probs.argmax(1)
        assert got.column("label").to_pylist() == [id2label[int(i)] for i in top], name
        assert np.abs(np.asarray(got.column("score").to_pylist()) - probs.max(1)).max() <= 1e-5, name


# ------------------------------------------------------------------------------------------------- bad inputs

def test_bad_inputs(tmp_path):
    good = base_table(mixed_texts(10))
    real = write_input(tmp_path / "real.parquet", good)
    (tmp_path / "random.parquet").write_bytes(np.random.default_rng(0).bytes(5000))
    data = real.read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) * 3 // 5])
    pq.write_table(good.slice(0, 0), tmp_path / "no_rows.parquet")
    (tmp_path / "no_rows.jsonl").write_text("")
    (tmp_path / "no_rows.csv").write_text("id,text\n")
    pq.write_table(good, tmp_path / "data.txt")  # parquet bytes behind an unknown suffix
    (tmp_path / "dir_empty").mkdir()
    (tmp_path / "dir_mixed").mkdir()
    write_input(tmp_path / "dir_mixed" / "a.parquet", good)
    write_input(tmp_path / "dir_mixed" / "b.csv", good)

    # name -> (input, extra args, words the one-line error must contain (any of each tuple))
    cases = {
        "missing column": (real, ["--column", "body"], [("body",), ("text",), ("extra",), ("num",)]),
        "missing keep column": (real, ["--keep", "extra,nope"], [("nope",)]),
        "missing id column": (real, ["--id-column", "ident"], [("ident",)]),
        "non-text column": (real, ["--column", "num"], [("num",)]),
        "missing file": (tmp_path / "absent.parquet", [], [("absent.parquet",)]),
        "random bytes": (tmp_path / "random.parquet", [], [("random.parquet",)]),
        "truncated": (tmp_path / "truncated.parquet", [], [("truncated.parquet",)]),
        "no rows parquet": (tmp_path / "no_rows.parquet", [], [("row", "empty")]),
        "no rows jsonl": (tmp_path / "no_rows.jsonl", [], [("row", "empty")]),
        "no rows csv": (tmp_path / "no_rows.csv", [], [("row", "empty")]),
        "unknown suffix": (tmp_path / "data.txt", [], [("format", "suffix")]),
        "empty directory": (tmp_path / "dir_empty", [], [("dir_empty",)]),
        "mixed formats in a directory": (tmp_path / "dir_mixed", [], [("format", "csv", "mix")]),
    }
    outs = {name: tmp_path / f"out_{i}" for i, name in enumerate(cases)}
    procs = cli_many([["embed", src, outs[name], *extra, "--no-progress"] for name, (src, extra, _) in cases.items()])
    failures = []
    for (name, (src, extra, words)), p in zip(cases.items(), procs):
        try:
            line = error_line(p)
            for alternatives in words:
                assert any(w.lower() in line.lower() for w in alternatives), \
                    f"the error does not name {' or '.join(alternatives)!r}: {line!r}"
            out = outs[name]
            left = sorted(f.name for f in out.iterdir()) if out.exists() else []
            assert not [f for f in left if f.startswith("part-") or f.startswith(".")], f"left behind: {left}"
        except AssertionError as e:
            failures.append(f"[{name}] {e}")
    assert not failures, "\n\n".join(failures)


def test_corrupted_file_in_a_directory_writes_no_shard(tmp_path):
    """A directory whose second Parquet file is corrupted fails before any shard is written (Parquet footers
    can all be read up front), rather than leaving shards of the first file behind."""
    src = tmp_path / "in"
    src.mkdir()
    write_input(src / "a.parquet", base_table(spread(20, max_chars=200)))
    (src / "b.parquet").write_bytes(b"PAR1 not really parquet at all PAR1")
    out = tmp_path / "out"
    line = error_line(cli("embed", src, out, "--shard-rows", 4, "--no-progress"))
    assert "b.parquet" in line, line
    left = sorted(f.name for f in out.iterdir()) if out.exists() else []
    assert not [f for f in left if f.startswith("part-") or f.startswith(".")], f"left behind: {left}"


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_kept_column_type_widens_after_the_first_block(tmp_path, fmt):
    """A kept numeric column that holds ints in the first MiB of a JSONL / CSV file and a float later (a valid
    file, which pyarrow's whole-file readers accept) is carried through, not an error mid-stream."""
    n = 600
    pad = "x" * 2500  # rows of ~2.5 kB: the file spans more than one 1 MiB read block
    table = pa.table({"id": pa.array(range(n), pa.int64()), "text": pa.array([f"t{i}" for i in range(n)]),
                      "pad": pa.array([pad] * n)})
    scores = [str(i) for i in range(n - 3)] + ["1.5", "2.5", "3.25"]
    src = tmp_path / f"in.{fmt}"
    if fmt == "jsonl":
        with open(src, "w") as f:
            for row, sc in zip(table.to_pylist(), scores):
                f.write(json.dumps({**row, "score": float(sc) if "." in sc else int(sc)}) + "\n")
    else:
        with open(src, "w") as f:
            f.write("id,text,pad,score\n")
            for row, sc in zip(table.to_pylist(), scores):
                f.write(f"{row['id']},{row['text']},{row['pad']},{sc}\n")
    assert src.stat().st_size > 1 << 20
    out = tmp_path / "out"
    ok(cli("embed", src, out, "--id-column", "id", "--keep", "score", "--no-progress"))
    got = read_out(out)
    assert got.column("id").to_pylist() == list(range(n))
    assert got.column("score").to_pylist() == [float(s) for s in scores]


def test_csv_multiline_quoted_values(tmp_path):
    """Quoted CSV values holding newlines (documents, as ``pyarrow.csv.write_csv`` writes them) in a file of more
    than one 1 MiB read block: every row read whole (pyarrow needs ``newlines_in_values=True`` for this)."""
    n = 500
    texts = [f"line {i}\nsecond line, with a comma" for i in range(n)]
    table = pa.table({"id": pa.array(range(n), pa.int64()), "text": pa.array(texts),
                      "notes": pa.array([("y" * 50 + "\n") * 50] * n)})
    src = write_input(tmp_path / "in.csv", table)
    assert src.stat().st_size > 1 << 20
    out = tmp_path / "out"
    ok(cli("embed", src, out, "--id-column", "id", "--no-progress"))
    got = read_out(out)
    assert got.column("id").to_pylist() == list(range(n))
    rows = list(range(0, n, 50))
    assert np.abs(embeddings(got)[rows] - encode([texts[i] for i in rows])).max() <= 1e-5


def test_format_overrides_the_suffix(tmp_path):
    table = base_table(mixed_texts(10))
    src = tmp_path / "data.txt"
    pq.write_table(table, src)
    out = tmp_path / "out"
    ok(cli("embed", src, out, "--format", "parquet", "--id-column", "id", "--no-progress"))
    got = read_out(out)
    assert got.column("id").to_pylist() == table.column("id").to_pylist()
    assert np.abs(embeddings(got) - encode(table.column("text").to_pylist())).max() <= 1e-5


def test_dictionary_encoded_text_column(tmp_path):
    """A text column stored dictionary-encoded (a pandas ``category`` column, or pyarrow's dictionary type, as
    Parquet writers often keep it) is text."""
    texts = ["a b", "c", "a b", None, "longer text here", "c"]
    table = pa.table({"id": pa.array(range(len(texts)), pa.int64()),
                      "text": pa.array(texts, pa.string()).dictionary_encode()})
    src = write_input(tmp_path / "in.parquet", table)
    assert pa.types.is_dictionary(pq.read_schema(src).field("text").type)
    out = tmp_path / "out"
    ok(cli("embed", src, out, "--id-column", "id", "--no-progress"))
    got = read_out(out)
    assert got.column("id").to_pylist() == list(range(len(texts)))
    assert np.abs(embeddings(got) - encode([t or "" for t in texts])).max() <= 1e-5


def test_csv_text_that_looks_numeric_stays_text(tmp_path):
    """CSV type inference does not turn a text column of digits into numbers (``007`` stays ``007``)."""
    texts = ["007", "123", "4.5", "1e3", "true", "0042"]
    src = tmp_path / "in.csv"
    src.write_text("id,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(texts)))
    out = tmp_path / "out"
    ok(cli("embed", src, out, "--id-column", "id", "--no-progress"))
    got = read_out(out)
    assert got.column("id").to_pylist() == list(range(len(texts)))
    assert np.abs(embeddings(got) - encode(texts)).max() <= 1e-5


# ------------------------------------------------------------------------------- crash, resume, rerun policies

KILL_ROWS, KILL_SHARD = 240, 20  # 12 shards: killed after the first, most still to go


def test_kill_and_resume(tmp_path):
    texts = spread(KILL_ROWS)
    table = pa.table({"id": pa.array(range(KILL_ROWS), pa.int64()), "text": pa.array(texts, pa.string())})
    src = write_input(tmp_path / "big.parquet", table)
    out = tmp_path / "out"
    args = ["embed", src, out, "--id-column", "id", "--shard-rows", KILL_SHARD, "--no-progress"]
    n_shards = KILL_ROWS // KILL_SHARD

    code, killed_log = kill_when([sys.executable, "-m", "padfree.cli", *map(str, args)], ENV,
                                 tmp_path / "killed.log", lambda: bool(shards(out)))
    assert code == -signal.SIGKILL, f"the job ended before it was killed ({code}):\n{killed_log}"
    done = stats(out)
    assert 1 <= len(done) < n_shards, f"killed after {len(done)} of {n_shards} shards"
    for f in shards(out):  # a visible shard is a finished one
        assert pq.ParquetFile(f).metadata.num_rows == KILL_SHARD, f.name

    resumed = ok(cli(*args))
    summary_line(resumed)
    assert [f.name for f in shards(out)] == [f"part-{i:05d}.parquet" for i in range(n_shards)]
    after = stats(out)
    assert {k: after[k] for k in done} == done, "the resumed run rewrote shards that were finished"
    got = read_out(out)
    assert got.column("id").to_pylist() == list(range(KILL_ROWS))
    emb = embeddings(got)
    # against an uninterrupted encode: every row of the shard cut by the kill, and every 20th row elsewhere
    cut = len(done) * KILL_SHARD
    rows = sorted(set(range(0, KILL_ROWS, 20)) | set(range(cut, min(cut + KILL_SHARD, KILL_ROWS))))
    ref = encode([texts[i] for i in rows])
    assert np.abs(emb[rows] - ref).max() <= 1e-5
    assert not [f.name for f in out.iterdir() if f.name.startswith(".")], "temporary files left behind"

    again = ok(cli(*args))
    assert "nothing to do" in (again.stdout + again.stderr), describe(again)
    assert stats(out) == after


def test_rerun_policies(tmp_path):
    table = base_table(mixed_texts(40))
    src = write_input(tmp_path / "in.parquet", table)
    out = tmp_path / "out"
    base = ["--id-column", "id", "--keep", "extra", "--shard-rows", 16, "--no-progress"]
    ok(cli("embed", src, out, *base))
    before = stats(out)
    assert len(before) == 4
    other_model = embedder_dir(tmp_path / "other_model", seed=1)

    # changed option(s) -> (args, patterns the one-line error must match): two alone, then all the others at once
    # (the refusal names every option that differs)
    changes = {
        "--column": (["--id-column", "id", "--keep", "extra", "--shard-rows", 16, "--column", "other"],
                     [r"--column\b|(?<![\w-])column\b"]),
        "--dtype": ([*base, "--dtype", "bf16"], [r"dtype"]),
        "--keep --id-column --skip-empty --shard-rows --model": (
            ["--id-column", "num", "--keep", "extra,num", "--shard-rows", 8, "--skip-empty", "--model", other_model],
            [r"keep", r"id[-_ ]column", r"skip[-_ ]empty", r"shard[-_ ]rows", r"model"]),
        "--id-column (dropped)": (["--keep", "extra", "--shard-rows", 16], [r"id[-_ ]column"]),
    }
    runs = [["embed", src, out, *a, "--no-progress"] for a, _ in changes.values()]
    runs.append(["embed", src, out, *base, "--max-batch-tokens", 64])  # not output-changing
    procs = cli_many(runs)
    failures = []
    for (name, (_, patterns)), p in zip(changes.items(), procs):
        try:
            line = error_line(p)
            missing = [pat for pat in patterns if not re.search(pat, line, re.I)]
            assert not missing, f"the refusal does not name {missing} ({name}): {line!r}"
        except AssertionError as e:
            failures.append(f"[{name}] {e}")
    mbt = procs[-1]
    if mbt.returncode != 0 or "nothing to do" not in mbt.stdout + mbt.stderr:
        failures.append(f"[--max-batch-tokens] should be a finished job, nothing to do:\n{describe(mbt)}")
    assert stats(out) == before, "a refused run touched the shards"
    assert not failures, "\n\n".join(failures)

    # --overwrite redoes everything with the new options, and leaves no shard of the old job
    new = ["--id-column", "id", "--shard-rows", 32, "--column", "other", "--no-progress"]
    ok(cli("embed", src, out, *new, "--overwrite"))
    assert [f.name for f in shards(out)] == ["part-00000.parquet", "part-00001.parquet"]
    got = read_out(out)
    assert got.column_names == ["id", "embedding"]
    assert got.column("id").to_pylist() == table.column("id").to_pylist()
    assert np.abs(embeddings(got) - encode(table.column("other").to_pylist())).max() <= 1e-5
    again = ok(cli("embed", src, out, *new))
    assert "nothing to do" in again.stdout + again.stderr, describe(again)


def test_overwrite_into_a_directory_that_holds_no_job(tmp_path):
    """``--overwrite`` into a non-empty directory with no manifest (e.g. a Spark output with part-*.parquet and
    other files): either it refuses and deletes nothing, or it succeeds and the directory reads back as exactly
    this job's rows (no foreign part file mixed in)."""
    table = base_table(mixed_texts(10))
    src = write_input(tmp_path / "in.parquet", table)
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(table.slice(0, 3), out / "part-00007.parquet")
    (out / "notes.txt").write_text("not padfree's")
    before = sorted(f.name for f in out.iterdir())
    p = cli("embed", src, out, "--id-column", "id", "--overwrite", "--no-progress")
    if p.returncode != 0:
        line = error_line(p)
        assert sorted(f.name for f in out.iterdir()) == before, f"a refused run deleted files ({line!r})"
    else:
        got = read_out(out)
        assert got.column("id").to_pylist() == table.column("id").to_pylist()
