"""``padfree serve`` as an orchestrator runs it: every flag from the environment (the flag winning), the socket
bound at once with ``/ready`` 503 while the models load, a model that cannot load ending the process with one
line, and the drain after SIGTERM (``/ready`` and new inference requests 503, requests in flight finished)."""
from __future__ import annotations

import http.server
import json
import signal
import threading
import time

import httpx
import numpy as np
import pytest

import padfree
from padfree.serve.cli import parse_args

from otlp_receiver import OtlpHttpReceiver
from serving import Server, classifier_dir, free_port, minilm_path
from test_engine import hf_probabilities
from test_hub import write_cache

MINILM = "sentence-transformers/all-MiniLM-L6-v2"  # served by its Hub ID, under that name

FP32_TOL = 1e-5


def test_every_flag_reads_its_environment_variable_and_the_flag_wins():
    env = {"PADFREE_PORT": "9123", "PADFREE_HOST": "0.0.0.0", "PADFREE_AUTO_TRUNCATE": "true",
           "PADFREE_MODEL": "a=/x, b=/y", "PADFREE_DTYPE": "fp32", "PADFREE_DRAIN_DELAY": "2.5",
           "PADFREE_API_KEY": "k"}
    args = parse_args([], env)
    assert (args.port, args.host, args.auto_truncate, args.model, args.dtype, args.drain_delay, args.api_key) == \
        (9123, "0.0.0.0", True, ["a=/x", "b=/y"], "fp32", 2.5, "k")
    args = parse_args(["--port", "7000", "--model", "c=/z", "--dtype", "bf16"], env)
    assert (args.port, args.model, args.dtype) == (7000, ["c=/z"], "bf16")
    assert parse_args([], {}).port == 8080 and parse_args([], {}).model is None


@pytest.mark.parametrize("env, words", [
    ({"PADFREE_PORT": "eighty"}, "PADFREE_PORT='eighty' is not a valid int"),
    ({"PADFREE_DTYPE": "fp8"}, "PADFREE_DTYPE='fp8': choose from"),
    ({"PADFREE_AUTO_TRUNCATE": "maybe"}, "PADFREE_AUTO_TRUNCATE='maybe': expected true or false"),
    ({"PADFREE_API_KEY": "k", "PADFREE_API_KEY_FILE": "/k"}, "give the API key once"),
])
def test_a_bad_environment_value_is_named(env, words, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([], env)
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_help_names_each_variable(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"], {})
    out = " ".join(capsys.readouterr().out.split())
    for name in ("PADFREE_MODEL", "PADFREE_PORT", "PADFREE_HOST", "PADFREE_API_KEY", "PADFREE_API_KEY_FILE",
                 "PADFREE_REVISION", "PADFREE_HF_TOKEN_FILE", "PADFREE_OTLP_ENDPOINT", "PADFREE_JSON_LOGS"):
        assert f"[env {name}]" in out


def test_a_model_that_is_neither_a_directory_nor_an_id_is_refused_before_binding(tmp_path):
    from padfree.serve.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "absent"), "--port", str(free_port())])
    assert str(e.value) == (f"padfree serve: error: --model {tmp_path / 'absent'}: model '{tmp_path / 'absent'}' "
                            "is neither a directory nor a Hugging Face Hub ID (org/name)")


class _HeldHub:
    """A loopback stand-in for the Hub that holds every request for the model until released, then answers 404:
    a model that takes as long as the test wants to load, and then fails."""

    def __init__(self):
        self.release = threading.Event()
        self.paths: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if "held-model" in self.path:  # the model's requests wait (others, such as huggingface_hub's
                    hub.paths.append(self.path)  # own look-ups, are answered at once)
                    hub.release.wait(60)
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Error-Code", "RepoNotFound")
                body = b'{"error": "Repository not found"}'
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()


def test_binds_at_once_503_while_loading_and_a_model_that_fails_to_load_ends_the_process(tmp_path):
    hub = _HeldHub()
    try:
        s = Server(["--model", "org/held-model"], tmp_path / "server.log", wait=False,
                   env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hub")})
        deadline = time.monotonic() + 120
        while not hub.paths and time.monotonic() < deadline:  # the load has started, and is held
            assert s.proc.poll() is None, s.log()
            time.sleep(0.05)
        assert hub.paths and "org/held-model" in hub.paths[0]
        while time.monotonic() < deadline:
            try:
                r = httpx.get(s.url + "/ready")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert r.status_code == 503 and r.json() == {
            "error": "loading model 'org/held-model' (0 of 1 loaded); retry later", "error_type": "Unhealthy"}
        assert httpx.get(s.url + "/health").status_code == 200  # alive while loading
        r = httpx.post(s.url + "/embed", json={"inputs": ["x"]})
        assert r.status_code == 503 and "loading model 'org/held-model'" in r.json()["error"]
        r = httpx.post(s.url + "/v1/embeddings", json={"input": "x"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        hub.release.set()
        assert s.proc.wait(60) == 1
        errors = [line for line in s.log().splitlines() if "padfree serve: error:" in line]
        assert len(errors) == 1 and "org/held-model" in errors[0], s.log()
        assert "Traceback" not in s.log()
    finally:
        hub.close()
        if s.proc.poll() is None:
            s.proc.kill()


def test_configured_by_environment_then_drained_by_sigterm(tmp_path, monkeypatch):
    """A server configured only through PADFREE_* (models, one by Hub ID from the cache, key, limits, drain delay,
    tracing, JSON logs): auth on inference routes but not on the probes, the limits in force, the request's trace
    and log line, huggingface_hub's InferenceClient on the default model (a classifier); after SIGTERM /ready and new requests answer 503 for the drain delay while a request in flight
    finishes, then the process exits 0."""
    import huggingface_hub
    from huggingface_hub import InferenceClient

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the suite runs offline (Makefile)
    offline = padfree.SentenceEncoder.from_pretrained(minilm_path())
    clf = classifier_dir(tmp_path / "clf", 3, seed=2)
    root = minilm_path()  # MiniLM by Hub ID, from a Hugging Face cache, offline
    write_cache(tmp_path / "hf", MINILM, {p.relative_to(root).as_posix(): p.read_bytes()
                                          for p in root.rglob("*") if p.is_file()})
    collector = OtlpHttpReceiver()
    env = {"PADFREE_MODEL": f"clf={clf},{MINILM}", "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "PADFREE_API_KEY": "env-key-123",
           "PADFREE_MAX_CLIENT_BATCH_SIZE": "40", "PADFREE_DRAIN_DELAY": "3", "PADFREE_AUTO_TRUNCATE": "1",
           "PADFREE_OTLP_ENDPOINT": collector.endpoint, "PADFREE_JSON_LOGS": "yes",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    s = Server([], tmp_path / "server.log", env=env)
    key = {"Authorization": "Bearer env-key-123"}
    try:
        # tracing: the client's traceparent is the parent of the request's span, which has the four children
        trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
        r = httpx.post(s.url + "/v1/embeddings", json={"input": ["traced text", "and another"], "model": MINILM},
                       headers={**key, "traceparent": f"00-{trace_id}-{parent}-01", "x-request-id": "req-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
        deadline = time.monotonic() + 20  # the probes' spans arrive too: wait for this trace's five
        while len(spans := [x for x in collector.spans if x.trace_id == trace_id]) < 5 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        root = next(x for x in spans if x.kind == "SERVER")
        assert root.name == "POST /v1/embeddings" and root.parent_span_id == parent
        assert root.attributes["http.response.status_code"] == 200 and root.status != "ERROR"
        children = {x.name: x for x in spans if x.parent_span_id == root.span_id}
        assert set(children) == {"tokenize", "queue", "inference", "postprocess"}
        assert children["inference"].attributes["padfree.tokens"] == r.json()["usage"]["total_tokens"]
        order = [children[n] for n in ("tokenize", "queue", "inference", "postprocess")]
        assert all(root.start_ns <= x.start_ns <= x.end_ns <= root.end_ns for x in order)
        assert all(a.end_ns <= b.start_ns + 1000 for a, b in zip(order, order[1:]))  # one after the other
        # JSON logs: the request's line, with its fields
        lines = [json.loads(line) for line in s.log().splitlines() if line.startswith("{")]
        mine = [x for x in lines if x.get("request_id") == "req-42"]
        assert len(mine) == 1 and mine[0]["route"] == "/v1/embeddings" and mine[0]["status"] == 200
        assert mine[0]["model"] == MINILM and mine[0]["texts"] == 2 and mine[0]["tokens"] > 0
        assert all(line.startswith("{") for line in s.log().splitlines() if line.strip())  # uvicorn's too

        assert httpx.get(s.url + "/ready").json() == {"status": "ready", "models": ["clf", MINILM]}
        assert httpx.post(s.url + "/embed", json={"inputs": ["x"], "model": MINILM}).status_code == 401
        r = httpx.post(s.url + "/embed", json={"inputs": ["x"] * 41, "model": MINILM}, headers=key)
        assert r.status_code == 413 and "limit of 40" in r.json()["error"]
        texts = [f"text number {i} " * (1 + i % 30) for i in range(40)]
        r = httpx.post(s.url + "/embed", json={"inputs": texts, "model": MINILM}, headers=key)
        assert r.status_code == 200 and np.abs(np.array(r.json()) - offline.encode(texts)).max() <= FP32_TOL
        labels = InferenceClient(base_url=s.url, api_key="env-key-123").text_classification(texts[3], top_k=2)
        want = hf_probabilities(clf, [texts[3]])[0]
        assert [x.label for x in labels] == [f"label_{'abc'[i]}" for i in np.argsort(-want)[:2]]
        assert max(abs(x.score - want["abc".index(x.label[-1])]) for x in labels) <= 1e-5

        slow: dict = {}
        big = [t * 20 for t in texts]  # cut at 256 tokens: a request that is still running at SIGTERM

        def send():
            slow["r"] = httpx.post(s.url + "/embed", json={"inputs": big, "model": MINILM}, headers=key,
                                   timeout=120)

        th = threading.Thread(target=send)
        th.start()
        deadline = time.monotonic() + 60  # until the request is in the server (or, on a fast machine, done)
        while th.is_alive() and "padfree_requests_in_flight 1.0" not in httpx.get(s.url + "/metrics").text \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        r = httpx.get(s.url + "/ready")
        assert r.status_code == 503 and r.json()["error"] == "the server is shutting down"
        r = httpx.post(s.url + "/embed", json={"inputs": ["x"]}, headers=key)
        assert r.status_code == 503 and r.json()["error"] == "the server is shutting down"
        th.join(120)
        assert slow["r"].status_code == 200
        assert np.abs(np.array(slow["r"].json()) - offline.encode(big)).max() <= FP32_TOL
        assert s.proc.wait(60) == 0, s.log()
        assert time.monotonic() - t0 >= 3.0 - 0.3  # the drain delay was kept
    finally:
        collector.close()
        if s.proc.poll() is None:
            s.proc.kill()
