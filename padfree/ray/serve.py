"""Ray Serve: ``padfree serve``'s FastAPI app, replicated by Ray Serve.

Each replica loads its models in ``__init__`` and builds the very app of ``padfree serve``
(:func:`padfree.serve.app.create_app`): same routes, limits (payload, batch size, in-flight per replica, API key),
error bodies and metrics. Ray Serve runs the app's lifespan on the replica (it starts the Scheduler, which
batches the requests of that replica by its token budget, and drains it when the replica stops). Ray Serve routes
requests between replicas, restarts a replica that dies and scales with ``autoscaling_config``; we add nothing.
"""
from __future__ import annotations

from ray import serve

from ..serve.app import ModelSpec, ServeConfig
from ..startup import open_pipeline, parse_dtype


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress()
class PadfreeServer:
    """One replica: its models loaded and warmed up, then ``create_app`` over them."""

    def __init__(self, models: list[ModelSpec], config: ServeConfig):
        from ..serve.app import Served

        self.served = [Served(m.name, open_pipeline(m.source, m.dtype, revision=m.revision, token=m.token),
                              m.source) for m in models]
        self.config = config

    def __serve_build_asgi_app__(self):
        from ..serve.app import create_app
        return create_app(self.served, self.config)


def serve_app(models: list[tuple[str, str] | ModelSpec], dtype: str = "auto", config: ServeConfig | None = None,
              num_replicas: int | str = 1, autoscaling_config: dict | None = None,
              ray_actor_options: dict | None = None):
    """A Ray Serve application serving ``models`` ([(name, path or Hub ID)] in ``dtype``, or
    :class:`padfree.serve.app.ModelSpec`; the first is the default) as
    ``padfree serve`` does: ``serve.run(serve_app([("minilm", path)]), route_prefix="/")``.

    ``num_replicas``: replicas (each loads every model and batches its own requests); or
    ``autoscaling_config`` (Ray Serve's dict, e.g. ``{"min_replicas": 1, "max_replicas": 4}``) instead.
    ``ray_actor_options``: each replica's resources (default one CPU)."""
    parse_dtype(dtype)
    if not models:
        raise ValueError("no model to serve")
    options: dict = {}
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas
    if ray_actor_options is not None:
        options["ray_actor_options"] = ray_actor_options
    specs = [m if isinstance(m, ModelSpec) else ModelSpec(str(m[0]), str(m[1]), dtype) for m in models]
    return PadfreeServer.options(**options).bind(specs, config or ServeConfig())
