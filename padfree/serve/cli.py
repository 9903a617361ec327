"""``padfree serve``: load the models, warm them up, and serve them with uvicorn until SIGTERM / Ctrl-C, which
stop accepting, finish every queued and running request, and exit 0."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from ..batching import positive_int
from ..cpu import DTYPE_CHOICES as DTYPES

log = logging.getLogger("padfree.serve")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="padfree serve", description=__doc__)
    p.add_argument("--model", action="append", metavar="[NAME=]PATH",
                   help="a sentence-transformers / Hugging Face directory to serve, under NAME (default: the "
                        "directory's name); may repeat, the first is the default (default: the bundled "
                        "all-MiniLM-L6-v2)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="real tokens per forward (default 16384)")
    p.add_argument("--max-client-batch-size", type=int, default=64, help="inputs per request (default 64)")
    p.add_argument("--max-concurrent-requests", type=int, default=512,
                   help="inference requests in flight before 429 (default 512)")
    p.add_argument("--payload-limit", type=int, default=2_000_000, help="request body bytes before 413 (default 2e6)")
    p.add_argument("--auto-truncate", action="store_true",
                   help="cut inputs longer than the model's limit unless a request says truncate=false "
                        "(default: refuse them with 413)")
    p.add_argument("--api-key-file", help="a file holding the key every route but /health and /metrics needs "
                                          "(Authorization: Bearer KEY)")
    p.add_argument("--tokenization-workers", type=int, default=2)
    p.add_argument("--keep-alive-timeout", type=float, default=75.0, metavar="SECONDS",
                   help="close an idle HTTP keep-alive connection after this long (default 75: longer than the "
                        "clients' and load balancers' idle timeouts, so that they, not we, close it and never "
                        "send a request on a connection we are closing)")
    p.add_argument("--threads", type=int, help="torch threads for the forward (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="serve through Ray Serve (pip install 'padfree[ray]'): on the cluster at ADDRESS (e.g. "
                        "auto), or bare --ray to start a local one; same app and routes in every replica")
    p.add_argument("--ray-replicas", type=int, default=1, metavar="N",
                   help="with --ray: replicas, each loading every model and batching its own requests "
                        "(default 1; each takes --threads CPUs, default 1)")
    return p.parse_args(argv)


def _model_specs(specs: list[str] | None) -> list[tuple[str, str]]:
    if not specs:
        from ..startup import BUNDLED_MODEL, bundled_model_path
        try:
            return [(BUNDLED_MODEL, bundled_model_path())]
        except ValueError as e:
            raise SystemExit(f"padfree serve: error: {e}")
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or not path:
            raise SystemExit(f"padfree serve: error: --model {spec!r}: expected NAME=PATH or PATH")
        out.append((name, path))
    return out


def _read_key(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise SystemExit(f"padfree serve: error: cannot read --api-key-file {path}: {e.strerror}")
    if not key:
        raise SystemExit(f"padfree serve: error: --api-key-file {path} is empty")
    return key


def serve_config(args):
    """The ServeConfig of parsed arguments; SystemExit naming a bad value."""
    from .app import ServeConfig
    try:
        return ServeConfig(max_batch_tokens=args.max_batch_tokens, max_client_batch_size=args.max_client_batch_size,
                           max_concurrent_requests=args.max_concurrent_requests, payload_limit=args.payload_limit,
                           auto_truncate=args.auto_truncate, api_key=_read_key(args.api_key_file),
                           tokenization_workers=args.tokenization_workers)
    except ValueError as e:
        raise SystemExit(f"padfree serve: error: {e}")


def run_on_ray(args) -> None:
    """``padfree serve --ray``: the same app as a Ray Serve application on host:port until SIGTERM / Ctrl-C."""
    try:
        import ray
        from ray import serve

        from ..ray import serve_app
    except ImportError as e:
        raise SystemExit(f"padfree serve: error: --ray needs Ray: pip install 'padfree[ray]' ({e})")
    try:
        positive_int("--ray-replicas", args.ray_replicas)
    except ValueError as e:
        raise SystemExit(f"padfree serve: error: {e}")
    config = serve_config(args)
    models = _model_specs(args.model)

    def stop(*_):
        raise KeyboardInterrupt

    ray.init(address=args.ray, include_dashboard=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    try:
        serve.start(http_options={"host": args.host, "port": args.port,
                                  "keep_alive_timeout_s": round(args.keep_alive_timeout)})
        serve.run(serve_app(models, args.dtype, config, num_replicas=args.ray_replicas,
                            ray_actor_options={"num_cpus": args.threads or 1}), name="padfree", route_prefix="/")
        log.info("padfree serve --ray: %d replica(s) of %s on http://%s:%d", args.ray_replicas,
                 [n for n, _ in models], args.host, args.port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()  # Ray Serve lets running requests finish (graceful_shutdown_timeout_s), then the
        ray.shutdown()    # replicas' app lifespan stops their scheduler
    log.info("padfree serve --ray: stopped")


def build(args) -> "tuple":
    """(the FastAPI app, its ServerState) for parsed arguments: models loaded and warmed up."""
    from ..startup import open_pipeline
    from .app import Served, create_app

    config = serve_config(args)
    served = []
    for name, path in _model_specs(args.model):
        try:
            served.append(Served(name, open_pipeline(path, args.dtype), str(path)))
        except (ValueError, OSError) as e:
            raise SystemExit(f"padfree serve: error: --model {name}={path}: {e}")
    try:
        app = create_app(served, config)
    except ValueError as e:
        raise SystemExit(f"padfree serve: error: {e}")
    return app, app.state.padfree


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # our pool tokenizes; no second pool on the cores
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.keep_alive_timeout >= 1:
        raise SystemExit(f"padfree serve: error: --keep-alive-timeout must be >= 1 s; got {args.keep_alive_timeout}")
    if args.ray is not None:
        return run_on_ray(args)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    app, _ = build(args)
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           access_log=False, timeout_graceful_shutdown=None,
                                           timeout_keep_alive=args.keep_alive_timeout))
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal under the handler found before it started:
    # a no-op one here, so that a drained server exits 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started:
        sys.exit(1)
    log.info("padfree serve: drained and stopped")


if __name__ == "__main__":
    main(sys.argv[1:])
