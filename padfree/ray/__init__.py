"""Ray adapters: the same Tasks under Ray Data (batch jobs over a cluster) and Ray Serve (replicated serving).

Needs Ray (``pip install 'padfree[ray]'``); ``import padfree`` never imports this package.

- :class:`Embed` / :class:`Classify`: callable classes for ``Dataset.map_batches(..., batch_format="pyarrow",
  compute=ray.data.ActorPoolStrategy(size=N))``; each actor loads its model once, each call is
  :func:`padfree.jobs.runner.compute_shard`, so the columns are the local job's.
- :func:`run_job`: ``padfree embed/classify ... --ray``: read -> map_batches -> write_parquet.
- :func:`serve_app`: a Ray Serve application around the same FastAPI app as ``padfree serve``.
"""
from .data import Classify, Embed, run_job
from .serve import serve_app

__all__ = ["Embed", "Classify", "run_job", "serve_app"]
