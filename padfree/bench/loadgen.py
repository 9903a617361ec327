"""The closed-loop load client of ``padfree bench --workload serve``, one process per (server, concurrency).

Run by file path (``python padfree/bench/loadgen.py SPEC.json OUT.json``) so that it imports neither padfree nor
torch: the standard library, numpy, and uvloop where installed. It costs every server alike: one raw HTTP/1.1
keep-alive connection per client (``concurrency`` of them), ``POST`` of OpenAI's embeddings body with
``encoding_format: "base64"``, the JSON answer parsed and every vector decoded from base64 little-endian float32
and checked (count, dimension, finite).

SPEC: ``host``, ``port``, ``path``, ``model``, ``concurrency``, ``texts`` (the corpus), ``warmup`` and ``requests``
(lists of lists of indices into ``texts``), ``max_requests``, ``time_limit_s``, ``warmup_time_limit_s``,
``request_timeout_s``, ``dim``, ``keep`` (the vectors of measured requests with an index below it are returned,
base64, for the cosine check). OUT: ``seconds`` (the measured window: first send to last answer),
``done`` = ``[[request index, latency s, ok], ...]``, ``errors`` (the first messages), ``kept`` =
``{index: [base64, ...]}``, ``warmup_done``, ``loop``.
"""
from __future__ import annotations

import asyncio
import base64
import json
import sys
import time

import numpy as np


class Conn:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None
        self.answered = False

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """One request; a kept-alive connection the server closed meanwhile (uvicorn drops idle ones after 5 s)
        is replaced, and a request that got no byte back on a reused connection is sent once more on a new
        one, as HTTP clients do (httpcore, urllib3)."""
        reused = self.writer is not None and not self.reader.at_eof() and not self.writer.is_closing()
        if not reused:
            self.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            return await self._post(path, body)
        except (asyncio.IncompleteReadError, ConnectionError):
            if not reused or self.answered:
                raise
            self.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            return await self._post(path, body)

    async def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.answered = False
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Accept: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode("ascii")
        self.writer.write(head + body)
        await self.writer.drain()
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            self.answered = bool(e.partial)
            raise
        self.answered = True
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            data = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            data = b"".join(parts)
        else:
            data = await self.reader.read()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, data

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


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
    texts, path, model, dim = spec["texts"], spec["path"], spec["model"], spec["dim"]
    c, timeout, keep = spec["concurrency"], spec["request_timeout_s"], spec.get("keep", 0)
    bodies = {}

    def body(idx: list[int]) -> bytes:
        return json.dumps({"input": [texts[i] for i in idx], "model": model, "encoding_format": "base64"}).encode()

    conns = [Conn(spec["host"], spec["port"]) for _ in range(c)]
    errors: list[str] = []

    async def phase(reqs: list[list[int]], limit: int, deadline: float, record):
        nxt = 0

        async def worker(conn: Conn):
            nonlocal nxt
            while nxt < limit and time.perf_counter() < deadline:
                i = nxt
                nxt += 1
                b = bodies.pop(i, None) if record else None
                b = b or body(reqs[i])
                t = time.perf_counter()
                try:
                    status, data = await asyncio.wait_for(conn.post(path, b), timeout)
                    vecs = check(status, data, len(reqs[i]), dim)
                    ok = True
                except Exception as e:  # noqa: BLE001 - every failure is an error of the server under test
                    conn.close()
                    vecs, ok = None, False
                    if len(errors) < 20:
                        errors.append(f"request {i}: {type(e).__name__}: {e}"[:500])
                record(i, time.perf_counter() - t, ok, vecs)
        await asyncio.gather(*(worker(k) for k in conns))

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
    for k in conns:
        k.close()
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
