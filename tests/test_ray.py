"""padfree under Ray: the Ray Data job equals the local job row for row, and the Ray Serve app answers the real
OpenAI client as ``padfree serve`` does. One local cluster (2 CPUs, loopback) for the module."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
serve = pytest.importorskip("ray.serve")

import httpx  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from serving import Server, free_port, kill_when, minilm_path  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20,
             address="local")
    yield
    serve.shutdown()
    ray.shutdown()


def _input(path, n=200, row_group_size=64):
    from padfree.bench.corpus import stdlib_paragraphs
    texts = stdlib_paragraphs(limit=n)
    texts = [None if i % 17 == 5 else ("" if i % 29 == 3 else t) for i, t in enumerate(texts)]
    table = pa.table({"doc": pa.array([f"d{i:04d}" for i in range(len(texts))]), "text": pa.array(texts, pa.string()),
                      "year": pa.array(range(2000, 2000 + len(texts)), pa.int64()),
                      "other": pa.array(["x"] * len(texts))})
    pq.write_table(table, path, row_group_size=row_group_size)  # several row groups: several blocks
    return table


# actors x CPUs = all of the cluster's CPUs: the job hung when Ray's file listing task waited for a CPU
@pytest.mark.parametrize("skip_empty,actors,cpus,precision", [(False, 1, 2, "float32"), (True, 2, 1, "ubinary")])
def test_ray_data_job_equals_local_job(cluster, tmp_path, skip_empty, actors, cpus, precision):
    from padfree.jobs.runner import JobSpec, run_job
    from padfree.ray import run_job as run_on_ray

    n = 100  # 4 row groups of 32 (several blocks), map_batches of 24 rows
    _input(tmp_path / "in.parquet", n, row_group_size=32)
    common = dict(kind="embed", input=str(tmp_path / "in.parquet"), model=str(minilm_path()), id_column="doc",
                  keep=["year"], skip_empty=skip_empty, progress=False, shard_rows=24, precision=precision)
    run_job(JobSpec(output=str(tmp_path / "local"), **common))
    summary = run_on_ray(JobSpec(output=str(tmp_path / "ray"), **common), actors=actors, actor_cpus=cpus)
    local = pq.read_table(tmp_path / "local")
    # rows inside a file are in input order; the files (named by write task, in dispatch order) are not: sort by id
    parts = [pq.read_table(f) for f in (tmp_path / "ray").glob("*.parquet")]
    for t in parts:
        assert t.column("doc").to_pylist() == sorted(t.column("doc").to_pylist())
    theirs = pa.concat_tables(parts).sort_by("doc")
    assert theirs.schema.equals(local.schema), (theirs.schema, local.schema)
    assert summary["rows"] == local.num_rows == theirs.num_rows
    assert (local.num_rows < n) == skip_empty
    assert theirs.column("doc").to_pylist() == local.column("doc").to_pylist()
    assert theirs.column("year").to_pylist() == local.column("year").to_pylist()
    a = np.stack(theirs.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(local.column("embedding").to_numpy(zero_copy_only=False))
    if precision == "float32":
        np.testing.assert_allclose(a, b, atol=1e-5)
    else:  # sign bits packed: other batch-mates move a float by ~1e-7, which flips a bit only at a value that near 0
        assert a.dtype == np.uint8 and a.shape == (local.num_rows, 384 // 8)
        assert (np.unpackbits(a) != np.unpackbits(b)).mean() <= 1e-3


def test_ray_job_refuses_a_non_empty_output(cluster, tmp_path):
    from padfree.jobs.runner import JobSpec
    from padfree.ray import run_job as run_on_ray

    _input(tmp_path / "in.parquet")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-0.parquet").write_bytes(b"x")
    with pytest.raises(ValueError, match="not empty"):
        run_on_ray(JobSpec(kind="embed", input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"),
                           model=str(minilm_path()), progress=False))
    with pytest.raises(ValueError, match="has no column 'body'"):
        run_on_ray(JobSpec(kind="embed", input=str(tmp_path / "in.parquet"), output=str(tmp_path / "o2"),
                           model=str(minilm_path()), column="body", progress=False))


def test_ray_job_resumes_by_id_after_the_driver_dies(cluster, tmp_path):
    """The state a killed driver leaves: an unfinished manifest, some output files written, one cut short, some
    never written. The rerun keeps the intact files, computes exactly the other rows and equals the local job;
    then it is complete (a rerun does nothing), and other settings or a job without ids are refused."""
    import json
    import pyarrow.parquet as pq

    from padfree.jobs.runner import JobSpec, run_job
    from padfree.ray import run_job as run_on_ray

    n = 96  # 6 files of 16 rows: one deleted, one cut short, four kept
    _input(tmp_path / "in.parquet", n)
    common = dict(kind="embed", input=str(tmp_path / "in.parquet"), model=str(minilm_path()), id_column="doc",
                  keep=["year"], progress=False, shard_rows=16, dtype="fp32")
    run_job(JobSpec(output=str(tmp_path / "local"), **common))
    out = tmp_path / "ray"
    first = run_on_ray(JobSpec(output=str(out), **common))
    assert first["rows"] == n and first["rows_done_before"] == 0
    files = sorted(out.glob("*.parquet"))
    assert len(files) >= 3, files
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["options"]["ray"] is True
    (out / "_manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    files[0].unlink()  # never written
    files[1].write_bytes(files[1].read_bytes()[:1000])  # cut short
    kept = sum(pq.ParquetFile(f).metadata.num_rows for f in files[2:])
    again = run_on_ray(JobSpec(output=str(out), **common))
    assert again["rows_done_before"] == kept and again["rows"] == n
    local = pq.read_table(tmp_path / "local")
    theirs = pa.concat_tables([pq.read_table(f) for f in out.glob("*.parquet")]).sort_by("doc")
    assert theirs.column("doc").to_pylist() == local.column("doc").to_pylist()  # each id once
    assert theirs.column("year").to_pylist() == local.column("year").to_pylist()
    a = np.stack(theirs.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(local.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert run_on_ray(JobSpec(output=str(out), **common)).get("nothing_to_do")
    with pytest.raises(ValueError, match="--dtype: 'fp32' before, 'bf16' now"):
        run_on_ray(JobSpec(output=str(out), **{**common, "dtype": "bf16"}))
    with pytest.raises(ValueError, match="--ray: True before, None now"):  # the local job does not take it over
        run_job(JobSpec(output=str(out), **common))
    no_ids = dict(common, id_column=None)
    run_on_ray(JobSpec(output=str(tmp_path / "noid"), **no_ids))
    manifest = json.loads((tmp_path / "noid" / "_manifest.json").read_text())
    (tmp_path / "noid" / "_manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ValueError, match="resumes by its ids"):
        run_on_ray(JobSpec(output=str(tmp_path / "noid"), **no_ids))
    assert run_on_ray(JobSpec(output=str(tmp_path / "noid"), **no_ids, overwrite=True))["rows"] == n


def test_ray_job_resumes_after_its_driver_is_killed(cluster, tmp_path):
    """A real crash: ``padfree embed --ray ADDRESS`` in a subprocess, SIGKILLed once its first output file is
    visible (Ray's writes are not atomic: files may be cut short). Run again once the killed job's workers are
    gone, the output holds every input row exactly once, equal to the local job (1e-5)."""
    import os
    import signal
    import sys

    from padfree.bench.corpus import stdlib_paragraphs
    from padfree.jobs.runner import JobSpec, run_job
    from padfree.ray import run_job as run_on_ray

    texts = stdlib_paragraphs(limit=240)  # 12 shards of 20: killed after the first
    pq.write_table(pa.table({"doc": [f"d{i:05d}" for i in range(len(texts))], "text": texts}),
                   tmp_path / "in.parquet", row_group_size=20)
    common = dict(kind="embed", input=str(tmp_path / "in.parquet"), model=str(minilm_path()), id_column="doc",
                  progress=False, shard_rows=20)
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "padfree.cli", "embed", common["input"], str(out), "--id-column", "doc",
           "--model", common["model"], "--shard-rows", "20", "--no-progress",
           "--ray", ray.get_runtime_context().gcs_address]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    code, killed_log = kill_when(cmd, env, tmp_path / "killed.log", lambda: any(out.glob("*.parquet")))
    assert code == -signal.SIGKILL, f"the job ended before it was killed ({code}):\n{killed_log}"
    deadline = time.monotonic() + 60  # Ray ends a dead driver's actors and tasks: wait until its CPU is free
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2, "the killed job's workers still hold the cluster"
    time.sleep(1)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] is False
    again = run_on_ray(JobSpec(output=str(out), **common))
    assert again["rows"] == 240 and again["rows_done_before"] < 240
    run_job(JobSpec(output=str(tmp_path / "local"), **common))
    local = pq.read_table(tmp_path / "local")
    theirs = pa.concat_tables([pq.read_table(f) for f in out.glob("*.parquet")]).sort_by("doc")
    assert theirs.column("doc").to_pylist() == local.column("doc").to_pylist()  # every row, each once
    a = np.stack(theirs.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(local.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(a, b, atol=1e-5)


BAD = [("/v1/embeddings", {"input": [], "model": "minilm"}),
       ("/v1/embeddings", {"input": "a", "model": "nope"}),
       ("/v1/embeddings", {"input": ["a"] * 65, "model": "minilm"}),
       ("/embed", {"inputs": "a", "dimensions": 385}),
       ("/embed", b'{"inputs": ["a"'),
       ("/nowhere", {"inputs": "a"})]


def _post(url, path, body):
    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(url + path, json=body, timeout=60)


def test_ray_serve_answers_like_padfree_serve(cluster, tmp_path):
    import openai

    import padfree
    from padfree.ray import serve_app
    from padfree.bench.corpus import stdlib_paragraphs

    # the reference server starts while the Ray Serve app deploys (it is waited for before its first request)
    reference = Server(["--model", f"minilm={minilm_path()}"], tmp_path / "serve.log", wait=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(serve_app([("minilm", str(minilm_path()))]), name="padfree", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the Ray Serve app did not become healthy"
            time.sleep(0.5)

        texts = stdlib_paragraphs(limit=40)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        got = client.embeddings.create(model="minilm", input=texts)
        ours = np.array([d.embedding for d in got.data], np.float32)
        expected = padfree.SentenceEncoder.from_pretrained(str(minilm_path())).encode(texts)
        np.testing.assert_allclose(ours, expected, atol=1e-5)
        assert got.usage.prompt_tokens > len(texts)

        try:
            reference.wait_ready()
            for path, body in BAD:
                r, want = _post(url, path, body), _post(reference.url, path, body)
                assert 400 <= want.status_code < 500, (path, want.text)
                assert (r.status_code, json.loads(r.content)) == (want.status_code, json.loads(want.content)), path
            with pytest.raises(openai.NotFoundError) as e:
                client.embeddings.create(model="nope", input="a")
            assert e.value.body["code"] == "model_not_found"
        finally:
            serve.delete("padfree")
    finally:
        reference.stop()
