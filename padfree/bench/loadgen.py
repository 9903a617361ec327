"""The closed-loop load client of ``padfree bench --workload serve``, one process per (server, concurrency).

Run by file path (``python padfree/bench/loadgen.py SPEC.json OUT.json``) so that it imports neither padfree nor
torch: the standard library, numpy, aiohttp, and uvloop where installed. It costs every server alike: one aiohttp
``ClientSession`` whose connector keeps at most ``concurrency`` HTTP/1.1 keep-alive connections, ``concurrency``
workers each ``POST``-ing OpenAI's embeddings body with ``encoding_format: "base64"`` as soon as its previous answer
is in, the JSON answer parsed and every vector decoded from base64 little-endian float32 and checked (count,
dimension, finite).

SPEC: ``host``, ``port``, ``path``, ``model``, ``concurrency``, ``texts`` (the corpus), ``warmup`` and ``requests``
(lists of lists of indices into ``texts``), ``max_requests``, ``time_limit_s``, ``warmup_time_limit_s``,
``request_timeout_s``, ``dim``, ``keep`` (the vectors of measured requests with an index below it are returned,
base64, for the cosine check). OUT: ``seconds`` (the measured window: first send to last answer),
``done`` = ``[[request index, latency s, ok], ...]``, ``errors`` (the first messages), ``kept`` =
``{index: [base64, ...]}``, ``warmup_done``, ``warmup_ok``, ``loop``.
"""
from __future__ import annotations

import asyncio
import base64
import json
import sys
import time

import aiohttp
import numpy as np


def check(status: int, data: bytes, n: int, dim: int) -> list[str]:
    """The base64 vectors of a good answer; raises ValueError with the reason otherwise."""
    if status != 200:
        raise ValueError(f"HTTP {status}: {data[:300]!r}")
    items = sorted(json.loads(data)["data"], key=lambda d: d["index"])
    if len(items) != n:
        raise ValueError(f"{len(items)} embeddings for {n} texts")
    out = []
    for d in items:
        e = d["embedding"]
        if not isinstance(e, str):
            raise ValueError(f"embedding is {type(e).__name__}, not base64")
        v = np.frombuffer(base64.b64decode(e), dtype="<f4")
        if v.shape != (dim,) or not np.isfinite(v).all():
            raise ValueError(f"embedding of shape {v.shape} (expected ({dim},)) or not finite")
        out.append(e)
    return out


async def run(spec: dict) -> dict:
    texts, model, dim = spec["texts"], spec["model"], spec["dim"]
    c, keep = spec["concurrency"], spec.get("keep", 0)
    url = f"http://{spec['host']}:{spec['port']}{spec['path']}"
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    bodies = {}

    def body(idx: list[int]) -> bytes:
        return json.dumps({"input": [texts[i] for i in idx], "model": model, "encoding_format": "base64"}).encode()

    errors: list[str] = []
    # keep-alive connections idle at most 4 s, under uvicorn's 5 s: aiohttp does not resend a POST on a pooled
    # connection the server closed meanwhile. No Accept-Encoding: every server answers uncompressed JSON alike.
    connector = aiohttp.TCPConnector(limit=c, keepalive_timeout=4)
    async with aiohttp.ClientSession(connector=connector, skip_auto_headers=("Accept-Encoding",),
                                     timeout=aiohttp.ClientTimeout(total=spec["request_timeout_s"])) as session:

        async def phase(reqs: list[list[int]], limit: int, deadline: float, record):
            nxt = 0

            async def worker():
                nonlocal nxt
                while nxt < limit and time.perf_counter() < deadline:
                    i = nxt
                    nxt += 1
                    b = bodies.pop(i, None) if record else None
                    b = b or body(reqs[i])
                    t = time.perf_counter()
                    try:
                        async with session.post(url, data=b, headers=headers) as r:
                            status, data = r.status, await r.read()
                        vecs = check(status, data, len(reqs[i]), dim)
                        ok = True
                    except Exception as e:  # noqa: BLE001 - every failure is an error of the server under test
                        vecs, ok = None, False
                        if len(errors) < 20:
                            errors.append(f"request {i}: {type(e).__name__}: {e}"[:500])
                    record(i, time.perf_counter() - t, ok, vecs)
            await asyncio.gather(*(worker() for _ in range(c)))

        warm = []
        await phase(spec["warmup"], len(spec["warmup"]), time.perf_counter() + spec["warmup_time_limit_s"],
                    lambda i, dt, ok, v: warm.append(ok))
        reqs = spec["requests"]
        limit = min(spec["max_requests"], len(reqs))
        for i in range(min(limit, 4 * c + 64)):  # bodies of the first requests ready before the clock starts
            bodies[i] = body(reqs[i])
        done, kept = [], {}

        def record(i, dt, ok, vecs):
            done.append([i, dt, ok])
            if ok and i < keep:
                kept[i] = vecs
        t0 = time.perf_counter()
        await phase(reqs, limit, t0 + spec["time_limit_s"], record)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "done": done, "errors": errors, "kept": kept,
            "warmup_done": len(warm), "warmup_ok": sum(warm)}


def main(argv: list[str]) -> None:
    spec = json.loads(open(argv[0]).read())
    try:
        import uvloop
        factory, loop = uvloop.new_event_loop, "uvloop"
    except ImportError:
        factory, loop = None, "asyncio"
    with asyncio.Runner(loop_factory=factory) as runner:
        out = runner.run(run(spec))
    out["loop"] = loop
    with open(argv[1], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1:])
