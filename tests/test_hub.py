"""Models by Hub ID (``padfree.hub``), with no network: a Hugging Face cache built here from the bundled MiniLM and
read offline by ID (library, ``open_pipeline``, ``padfree embed``), and the download path against a stand-in for the
Hub on loopback (the endpoints ``snapshot_download`` calls), which records every request.

huggingface_hub reads ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` once, when it is imported
(``huggingface_hub.constants``): inside this process the download tests pass ``cache_dir=`` / ``endpoint=`` to
:func:`padfree.hub.resolve_model`, and the offline switch, which has no argument, and the cache of the library's
``from_pretrained("org/name")`` are set on ``constants`` with ``monkeypatch`` (restored after each test); the CLI
subprocesses get a clean environment.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub import constants

import padfree
from padfree.hub import read_secret, resolve_model
from padfree.startup import open_pipeline
from serving import minilm_path

REPO = Path(__file__).resolve().parents[1]
CACHED_ID = "padfree-test/minilm-cached"
REV = hashlib.sha1(b"padfree-test-revision").hexdigest()
TEXTS = ["Hello, world!", "Padding-free inference packs the real tokens of every sequence into one batch.", "x"]
# what the download may fetch of MiniLM: not its README.md or data_config.json, never a decoy
WANTED = {"config.json", "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
          "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "1_Pooling/config.json"}
DECOYS = {"onnx/model.onnx": b"decoy", "onnx/config.json": b"{}", "openvino/openvino_model.bin": b"decoy",
          "pytorch_model.bin": b"decoy: the safetensors beside it are the weights"}


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def minilm_files() -> dict[str, bytes]:
    root = minilm_path()
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def expected() -> np.ndarray:
    """MiniLM's embeddings of :data:`TEXTS`, loaded from its directory."""
    return padfree.SentenceEncoder.from_pretrained(minilm_path()).encode(TEXTS)


def write_cache(cache: Path, repo_id: str, files: dict[str, bytes], rev: str = REV, ref: str = "main") -> Path:
    """huggingface_hub's cache layout of one model: ``blobs/<sha256>``, ``snapshots/<rev>/<file>`` links to the
    blobs, ``refs/<ref>`` holding the commit. Returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / rev / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(rev)
    return repo / "snapshots" / rev


@pytest.fixture(scope="module")
def cache(tmp_path_factory, minilm_files) -> Path:
    """A Hugging Face cache holding MiniLM as :data:`CACHED_ID` at :data:`REV` (``main``)."""
    root = tmp_path_factory.mktemp("hf-cache")
    write_cache(root, CACHED_ID, minilm_files)
    return root


def use_cache(monkeypatch, cache: Path, offline: bool = True) -> None:
    """This process's huggingface_hub reads ``cache`` (offline or not), as a process started with
    ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` would."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


class FakeHub:
    """The Hub endpoints ``snapshot_download`` calls, on a free loopback port: ``/api/models/{id}/revision/{rev}``
    (the commit and the file list), ``/api/models/{id}/tree/{commit}`` (the files with their sizes) and
    ``/{id}/resolve/{commit}/{file}`` (HEAD and GET, with ETag, X-Repo-Commit, Content-Length). Every request is
    recorded (method, path, headers); ``status`` set answers every request with that error."""

    def __init__(self, repos: dict[str, dict[str, bytes]], sha: str = REV, aliases=("main", "v1.0")):
        self.repos, self.sha, self.revisions = repos, sha, {sha, *aliases}
        self.etags = {d: hashlib.sha256(d).hexdigest() for files in repos.values() for d in files.values()}
        self.requests: list[tuple[str, str, dict]] = []
        self.status: int | None = None
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.hub = self
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fetched(self, repo_id: str) -> set[str]:
        """The files of ``repo_id`` whose contents were asked for (GET)."""
        prefix = f"/{repo_id}/resolve/{self.sha}/"
        return {p[len(prefix):] for m, p, _ in self.requests if m == "GET" and p.startswith(prefix)}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def do_GET(self) -> None:
        self.answer(body=True)

    def send(self, status: int, data: bytes, body: bool, headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def error(self, status: int, code: str, body: bool) -> None:
        self.send(status, json.dumps({"error": code}).encode(), body,
                  {"Content-Type": "application/json", "X-Error-Code": code})

    def answer(self, body: bool) -> None:
        hub: FakeHub = self.server.hub
        path = urllib.parse.urlsplit(self.path).path
        hub.requests.append((self.command, urllib.parse.unquote(path), dict(self.headers)))
        if hub.status is not None:
            return self.error(hub.status, "RepoNotFound" if hub.status in (401, 404) else "", body)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path)
        if m:
            repo_id, what, rev = m[1], m[2], urllib.parse.unquote(m[3])
            if repo_id not in hub.repos:
                return self.error(404, "RepoNotFound", body)
            if rev not in hub.revisions:
                return self.error(404, "RevisionNotFound", body)
            files = hub.repos[repo_id]
            out = ({"id": repo_id, "sha": hub.sha, "siblings": [{"rfilename": f} for f in files]} if what == "revision"
                   else [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                         for f, d in files.items()])
            return self.send(200, json.dumps(out).encode(), body, {"Content-Type": "application/json"})
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and m[1] in hub.repos and urllib.parse.unquote(m[2]) in hub.revisions:
            data = hub.repos[m[1]].get(urllib.parse.unquote(m[3]))
            if data is None:
                return self.error(404, "EntryNotFound", body)
            return self.send(200, data, body, {"ETag": f'"{hub.etags[data]}"',
                                               "X-Repo-Commit": hub.sha,
                                               "Content-Type": "application/octet-stream"})
        return self.error(404, "RepoNotFound", body)


@pytest.fixture(scope="module")
def hub(minilm_files):
    """The stand-in Hub: ``org/minilm`` (MiniLM plus decoys: ONNX, OpenVINO, a pytorch_model.bin beside the
    safetensors) and ``org/minilm-bin`` (MiniLM's weights as pytorch_model.bin only)."""
    from safetensors.torch import load_file
    buf = io.BytesIO()
    torch.save(load_file(minilm_path() / "model.safetensors"), buf)
    bin_only = {k: v for k, v in minilm_files.items() if k != "model.safetensors"}
    bin_only.update({"pytorch_model.bin": buf.getvalue(), "onnx/model.onnx": b"decoy"})
    server = FakeHub({"org/minilm": {**minilm_files, **DECOYS}, "org/minilm-bin": bin_only})
    yield server
    server.close()


@pytest.fixture
def online(monkeypatch, hub, tmp_path):
    """huggingface_hub online (the rest of the suite runs offline), an empty cache, the request log cleared."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub.requests.clear()
    hub.status = None
    return tmp_path / "hf-cache"


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------------- resolution

def test_directory_is_used_as_it_is(tmp_path):
    assert resolve_model(minilm_path()) == minilm_path()
    assert resolve_model(str(minilm_path())) == minilm_path()
    with pytest.raises(ValueError, match="revision 'v1' applies to Hub IDs only") as e:
        resolve_model(minilm_path(), revision="v1")
    one_line(e)
    with pytest.raises(ValueError, match="neither a directory nor a Hugging Face Hub ID") as e:
        padfree.SentenceEncoder.from_pretrained(str(tmp_path / "no" / "such" / "dir"))
    one_line(e)
    with pytest.raises(ValueError, match="is not a directory"):  # a file, even where its name is a valid ID
        resolve_model(minilm_path() / "config.json")


def test_token_file(tmp_path):
    f = tmp_path / "token"
    f.write_text("  hf_secret\n")
    assert read_secret(f) == "hf_secret"
    f.write_text(" \n")
    with pytest.raises(ValueError, match="is empty"):
        read_secret(f)
    with pytest.raises(ValueError, match="cannot read the Hub token file"):
        read_secret(tmp_path / "absent")


class _Asked(Exception):
    pass


@pytest.mark.parametrize("load", [
    padfree.from_pretrained, padfree.SentenceEncoder.from_pretrained, padfree.SparseEncoder.from_pretrained,
    padfree.SequenceClassifier.from_pretrained, padfree.TokenClassifier.from_pretrained,
    padfree.CrossEncoder.from_pretrained, open_pipeline])
def test_every_loader_takes_an_id_revision_and_token(monkeypatch, load):
    def download(repo_id, revision, token, cache_dir=None, endpoint=None):
        raise _Asked(repo_id, revision, token)
    monkeypatch.setattr("padfree.hub.download", download)
    with pytest.raises(_Asked) as e:
        load("org/name", revision="v2", token="hf_t")
    assert e.value.args == ("org/name", "v2", "hf_t")


def test_cached_id_loads_offline(monkeypatch, cache, expected, caplog):
    use_cache(monkeypatch, cache)
    enc = padfree.SentenceEncoder.from_pretrained(CACHED_ID)
    np.testing.assert_array_equal(enc.encode(TEXTS), expected)
    snapshot = cache / f"models--{CACHED_ID.replace('/', '--')}" / "snapshots" / REV
    assert resolve_model(CACHED_ID, revision=REV) == snapshot == resolve_model(CACHED_ID, revision="main")
    with caplog.at_level(logging.INFO, logger="padfree"):
        pipeline = open_pipeline(CACHED_ID, "fp32", "embed", warm=False)
    assert f"model {CACHED_ID} (embed)" in caplog.text  # the ID, not the snapshot's hash directory
    rows = pipeline.run_all(pipeline.prepare(TEXTS), 4096)
    np.testing.assert_allclose(np.stack(rows), expected, atol=1e-6)


def test_missing_id_offline_names_id_revision_and_cache(monkeypatch, cache):
    use_cache(monkeypatch, cache)
    with pytest.raises(ValueError) as e:
        padfree.SentenceEncoder.from_pretrained("padfree-test/absent", revision="v2")
    msg = one_line(e)
    assert "'padfree-test/absent'" in msg and "'v2'" in msg and str(cache) in msg and "HF_HUB_OFFLINE" in msg, msg
    with pytest.raises(ValueError, match=r"'padfree-test/absent' \(revision 'main'\)"):
        open_pipeline("padfree-test/absent", "fp32", warm=False)


# ---------------------------------------------------------------------------------------------------- download

def test_download_fetches_only_what_padfree_reads(online, hub, expected, monkeypatch):
    path = resolve_model("org/minilm", revision="v1.0", token="hf_given", cache_dir=online, endpoint=hub.url)
    assert path == online / "models--org--minilm" / "snapshots" / REV
    paths = [p for _, p, _ in hub.requests]
    assert "/api/models/org/minilm/revision/v1.0" in paths  # the revision asked for reached the Hub
    assert hub.fetched("org/minilm") == WANTED | {"model.safetensors"}
    assert not any("onnx" in p or "openvino" in p or p.endswith(".bin") for p in paths), paths
    assert all(h.get("authorization") == "Bearer hf_given" for _, _, h in hub.requests)
    enc = padfree.SentenceEncoder.from_pretrained(path)
    np.testing.assert_array_equal(enc.encode(TEXTS), expected)

    # cached now: offline, by ID and revision, with no request
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("org/minilm", revision="v1.0", cache_dir=online, endpoint=hub.url) == path
    assert hub.requests == []


def test_download_without_safetensors_takes_the_pytorch_weights(online, hub, expected, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")  # huggingface_hub's own token where none is given
    path = resolve_model("org/minilm-bin", cache_dir=online, endpoint=hub.url)
    assert hub.fetched("org/minilm-bin") == WANTED | {"pytorch_model.bin"}
    assert all(h.get("authorization") == "Bearer hf_from_env" for _, _, h in hub.requests)
    np.testing.assert_array_equal(padfree.SentenceEncoder.from_pretrained(path).encode(TEXTS), expected)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # and offline, from the cache
    assert resolve_model("org/minilm-bin", cache_dir=online, endpoint=hub.url) == path


@pytest.mark.parametrize("status, cause", [(401, "401"), (404, "404")])
def test_hub_refusal_is_one_line(online, hub, status, cause):
    hub.status = status
    with pytest.raises(ValueError) as e:
        resolve_model("org/minilm", token="hf_bad", cache_dir=online, endpoint=hub.url)
    msg = one_line(e)
    assert "'org/minilm'" in msg and cause in msg, msg


def test_unknown_revision_and_unreachable_hub(online, hub):
    with pytest.raises(ValueError) as e:
        resolve_model("org/minilm", revision="no-such-branch", cache_dir=online, endpoint=hub.url)
    assert "'no-such-branch'" in one_line(e) and "no such revision" in str(e.value)
    with pytest.raises(ValueError) as e:
        resolve_model("org/minilm", cache_dir=online, endpoint="http://127.0.0.1:9")  # nothing listens there
    msg = one_line(e)
    assert "'org/minilm'" in msg and "could not be reached" in msg and str(online) in msg, msg


# ---------------------------------------------------------------------------------------------------- CLI

def test_embed_cli_by_id_offline(cache, expected, tmp_path):
    """``padfree embed --model org/name --revision REV --hf-token-file FILE`` from the cache, offline, in a process
    with a clean Hugging Face environment: the embeddings, the manifest's model and revision, no token in it."""
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tmp_path / "token").write_text("hf_never_written\n")
    # no Hugging Face setting of this process's (HOME kept: torch's extension cache holds the native module)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))},
           "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-m", "padfree.cli", "embed", tmp_path / "in.jsonl", tmp_path / "out",
                        "--model", CACHED_ID, "--revision", REV, "--hf-token-file", tmp_path / "token",
                        "--dtype", "fp32", "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    table = pq.read_table(tmp_path / "out")
    got = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(), np.float32).reshape(-1, 384)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    manifest = (tmp_path / "out" / "_manifest.json").read_text()
    options = json.loads(manifest)["options"]
    assert options["model"] == CACHED_ID and options["revision"] == REV, options
    assert "hf_never_written" not in manifest


def test_embed_cli_bad_id_is_one_line(monkeypatch, cache, tmp_path, capsys):
    """A model neither a directory nor cached (offline): one line on stderr, exit 2 (the CLI's main, in this
    process: a second interpreter start costs more than the rest of the file)."""
    from padfree.jobs.cli import main
    use_cache(monkeypatch, cache)
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    (tmp_path / "token").write_text("\n")
    for args, needle in ((["--model", "padfree-test/absent"], "model 'padfree-test/absent' (revision 'main')"),
                         (["--model", "not/a/valid/id"], "neither a directory nor a Hugging Face Hub ID"),
                         (["--model", CACHED_ID, "--hf-token-file", str(tmp_path / "token")], "is empty")):
        with pytest.raises(SystemExit) as e:
            main("embed", [str(tmp_path / "in.jsonl"), str(tmp_path / "out"), "--no-progress", *args])
        assert e.value.code == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("padfree embed: error: ") and needle in lines[0], lines
        assert "absent" not in args[1] or str(cache) in lines[0], lines  # the cache searched
