"""Batch jobs over whole inputs: ``padfree embed`` / ``padfree classify`` (see :mod:`padfree.jobs.runner`)."""
from .runner import JobSpec, run_job

__all__ = ["JobSpec", "run_job"]
