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


ENV_PREFIX = "PADFREE_"


def parse_args(argv, environ=None):
    """The arguments of ``argv``, each flag defaulting to its environment variable ``PADFREE_<FLAG>`` (the flag
    winning); ``SystemExit`` naming a bad value of either."""
    p = argparse.ArgumentParser(prog="padfree serve", description=__doc__)
    p.add_argument("--model", action="append", metavar="[NAME=]ID_OR_PATH",
                   help="a Hugging Face Hub model ID (org/name) or a sentence-transformers / Hugging Face "
                        "directory to serve, under NAME (default: the ID, or the directory's name); may repeat, "
                        "the first is the default (default: the bundled all-MiniLM-L6-v2). In the environment: "
                        "a comma-separated list")
    p.add_argument("--revision", help="the Hub revision (branch, tag or commit) of every --model given by ID "
                                      "(default: main)")
    p.add_argument("--hf-token-file", help="a file holding the Hub token for private or gated models "
                                           "(default: HF_TOKEN, or huggingface_hub's stored login)")
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
    p.add_argument("--api-key", help="the key every route but /health, /ready and /metrics needs "
                                     "(Authorization: Bearer KEY); prefer the environment or --api-key-file, "
                                     "since a flag shows in the process list")
    p.add_argument("--api-key-file", help="a file holding that key")
    p.add_argument("--tokenization-workers", type=int, default=2)
    p.add_argument("--keep-alive-timeout", type=float, default=75.0, metavar="SECONDS",
                   help="close an idle HTTP keep-alive connection after this long (default 75: longer than the "
                        "clients' and load balancers' idle timeouts, so that they, not we, close it and never "
                        "send a request on a connection we are closing)")
    p.add_argument("--drain-delay", type=float, default=0.0, metavar="SECONDS",
                   help="after SIGTERM, answer 503 on /ready and new inference requests for at least this long "
                        "(and until the requests in flight finish) before closing the socket, so that a load "
                        "balancer polling /ready stops sending first (default 0)")
    p.add_argument("--threads", type=int, help="torch threads for the forward (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--json-logs", action="store_true", help="one JSON object per log line")
    p.add_argument("--otlp-endpoint", metavar="URL",
                   help="send OpenTelemetry traces (a span per request, with tokenize, queue, inference and "
                        "postprocess children) to this OTLP collector (pip install 'padfree[otel]')")
    p.add_argument("--otlp-protocol", choices=["http/protobuf", "grpc"], default="http/protobuf")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="serve through Ray Serve (pip install 'padfree[ray]'): on the cluster at ADDRESS (e.g. "
                        "auto), or bare --ray to start a local one; same app and routes in every replica")
    p.add_argument("--ray-replicas", type=int, default=1, metavar="N",
                   help="with --ray: replicas, each loading every model and batching its own requests "
                        "(default 1; each takes --threads CPUs, default 1)")
    lists = env_defaults(p, os.environ if environ is None else environ)
    args = p.parse_args(argv)
    for dest, value in lists.items():  # a list flag given on the command line replaces the environment's
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    if args.api_key is not None and args.api_key_file is not None:
        p.error("give the API key once: --api-key (PADFREE_API_KEY) or --api-key-file (PADFREE_API_KEY_FILE)")
    return args


def env_defaults(parser: argparse.ArgumentParser, environ) -> dict[str, list[str]]:
    """Set each option's default from ``PADFREE_<DEST>`` where the environment has it, and name the variable in
    the option's help. A repeatable option's value (a comma-separated list) is returned by dest instead, for the
    caller to use where the flag is not given (argparse would append the flags to it)."""
    lists = {}
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = ENV_PREFIX + action.dest.upper()
        action.help = f"{action.help or ''} [env {name}]".strip()
        raw = environ.get(name)
        if raw is None:
            continue
        if isinstance(action, argparse._AppendAction):
            lists[action.dest] = [x.strip() for x in raw.split(",") if x.strip()]
        elif isinstance(action, argparse._StoreTrueAction):
            action.default = _env_bool(parser, name, raw)
        else:
            try:
                value = action.type(raw) if action.type else raw
            except ValueError:
                parser.error(f"{name}={raw!r} is not a valid {action.type.__name__}")
            if action.choices is not None and value not in action.choices:
                parser.error(f"{name}={raw!r}: choose from {', '.join(map(str, action.choices))}")
            action.default = value
    return lists


def _env_bool(parser, name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    parser.error(f"{name}={raw!r}: expected true or false (1/0, yes/no, on/off)")


def _model_specs(args) -> list:
    """The models to load, as ``ModelSpec``s: ``NAME=SOURCE`` or ``SOURCE`` (named by the Hub ID, or by the
    directory's name); the bundled MiniLM where none is given. ``SystemExit`` naming a bad one."""
    from ..hub import check_repo_id
    from .app import ModelSpec
    token = _read_secret("--hf-token-file", args.hf_token_file, "Hub token")
    if not args.model:
        from ..startup import BUNDLED_MODEL, bundled_model_path
        try:
            return [ModelSpec(BUNDLED_MODEL, bundled_model_path(), args.dtype)]
        except ValueError as e:
            raise SystemExit(f"padfree serve: error: {e}")
    out = []
    for spec in args.model:
        name, sep, source = spec.partition("=")
        if not sep:
            name, source = (Path(spec).name if Path(spec).is_dir() else spec.rstrip("/")), spec
        if not name or not source:
            raise SystemExit(f"padfree serve: error: --model {spec!r}: expected NAME=ID_OR_PATH or ID_OR_PATH")
        local = Path(source).is_dir()
        if not local:  # refused now, before the socket is bound, where it cannot be a Hub ID either
            try:
                check_repo_id(source)
            except ValueError as e:
                raise SystemExit(f"padfree serve: error: --model {spec}: {e}")
        out.append(ModelSpec(name, source, args.dtype, None if local else args.revision, token))
    return out


def _read_secret(flag: str, path: str | None, what: str) -> str | None:
    """The secret in ``path`` (``None`` without one); ``SystemExit`` naming an unreadable or empty file."""
    from ..hub import read_secret
    try:
        return None if path is None else read_secret(path, what)
    except ValueError as e:
        raise SystemExit(f"padfree serve: error: {flag}: {e}")


def serve_config(args):
    """The ServeConfig of parsed arguments; SystemExit naming a bad value."""
    from .app import ServeConfig
    try:
        return ServeConfig(max_batch_tokens=args.max_batch_tokens, max_client_batch_size=args.max_client_batch_size,
                           max_concurrent_requests=args.max_concurrent_requests, payload_limit=args.payload_limit,
                           auto_truncate=args.auto_truncate,
                           api_key=args.api_key or _read_secret("--api-key-file", args.api_key_file, "API key"),
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
    models = _model_specs(args)

    def stop(*_):
        raise KeyboardInterrupt

    ray.init(address=args.ray, include_dashboard=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    try:
        serve.start(http_options={"host": args.host, "port": args.port,
                                  "keep_alive_timeout_s": round(args.keep_alive_timeout)})
        serve.run(serve_app(models, config=config, num_replicas=args.ray_replicas,
                            ray_actor_options={"num_cpus": args.threads or 1}), name="padfree", route_prefix="/")
        log.info("padfree serve --ray: %d replica(s) of %s on http://%s:%d", args.ray_replicas,
                 [m.name for m in models], args.host, args.port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()  # Ray Serve lets running requests finish (graceful_shutdown_timeout_s), then the
        ray.shutdown()    # replicas' app lifespan stops their scheduler
    log.info("padfree serve --ray: stopped")


def build(args):
    """The FastAPI app for parsed arguments, its models to be loaded once it starts (``SystemExit`` naming a bad
    argument: nothing is loaded yet)."""
    from .app import create_app
    try:
        return create_app((), serve_config(args), pending=_model_specs(args), tracing=start_tracing(args))
    except (ValueError, ImportError) as e:
        raise SystemExit(f"padfree serve: error: {e}")


def start_tracing(args):
    """The server's :class:`padfree.serve.telemetry.Tracing` to ``--otlp-endpoint`` (None without one)."""
    if args.otlp_endpoint is None:
        return None
    from .telemetry import Tracing
    return Tracing.start(args.otlp_endpoint, args.otlp_protocol)


def draining_server(config, state):
    """uvicorn's Server, draining before it stops: on the first SIGTERM / SIGINT ``state.draining`` is set
    (``/ready`` and new inference requests answer 503) and the socket stays open until the requests in flight and
    queued are done and ``drain_delay`` seconds have passed; then uvicorn's own graceful shutdown. A second
    signal goes straight to it."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        drain_delay = 0.0
        drain_since: float | None = None

        def handle_exit(self, sig, frame):
            if self.drain_since is None and self.started:
                self.drain_since = time.monotonic()
                state.draining = True
                log.info("padfree serve: draining (%d requests in flight)", state.in_flight)
            else:
                super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if self.drain_since is not None and not self.should_exit and state.in_flight == 0 \
                    and not state.engine.scheduler.busy \
                    and time.monotonic() - self.drain_since >= self.drain_delay:
                self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer(config)


def main(argv=None) -> None:
    args = parse_args(argv)
    from .telemetry import configure_logging
    configure_logging(args.log_level, args.json_logs)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # our pool tokenizes; no second pool on the cores
    if not args.keep_alive_timeout >= 1:
        raise SystemExit(f"padfree serve: error: --keep-alive-timeout must be >= 1 s; got {args.keep_alive_timeout}")
    if not args.drain_delay >= 0:
        raise SystemExit(f"padfree serve: error: --drain-delay must be >= 0 s; got {args.drain_delay}")
    if args.ray is not None:
        return run_on_ray(args)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    app = build(args)
    state = app.state.padfree
    import uvicorn
    server = draining_server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                            log_config=None, access_log=False, timeout_graceful_shutdown=None,
                                            timeout_keep_alive=args.keep_alive_timeout), state)
    server.drain_delay = args.drain_delay
    state.on_fatal = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises a signal it handled under the handler found before it started: a no-op one here, so
    # that a drained server exits 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started or state.load_error is not None:
        sys.exit(1)
    log.info("padfree serve: drained and stopped")


if __name__ == "__main__":
    main(sys.argv[1:])
