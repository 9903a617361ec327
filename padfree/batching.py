"""The one batcher: sequences cut into batches by a budget of real tokens, sorted by length inside a window, results
put back in input order. The library, the jobs and the Ray adapters batch through :func:`run_batched`; the
server's scheduler cuts its queue by the same budget rule (:func:`fits`) and runs each batch through the pipeline,
which sorts inside it.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

DEFAULT_BATCH_TOKENS = 8192  # the library's budget when neither batch_tokens nor batch_size is given
UNLIMITED = 1 << 62


def positive_int(name: str, value, what: str = "") -> int:
    """``value`` if it is an int >= 1; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{what}; got {value!r}")
    return value


def fits(used: int, n: int, budget: int) -> bool:
    """Whether an item of ``n`` tokens joins a batch already holding ``used``: always into an empty batch (an
    item longer than the budget forms its own), else only within the budget."""
    return not used or used + n <= budget


def token_budget_batches(lengths: Sequence[int], budget: int, max_items: int | None = None) -> list[tuple[int, int]]:
    """``(start, end)`` ranges of consecutive items whose lengths sum to at most ``budget`` and, if ``max_items`` is
    given, that hold at most that many items (an item longer than the budget alone forms a batch). ``ValueError``
    for a budget or count that is not a positive int."""
    positive_int("batch_tokens", budget)
    if max_items is not None:
        positive_int("batch_size", max_items, " (a count of texts)")
    out, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if used and (not fits(used, n, budget) or (max_items is not None and i - start >= max_items)):
            out.append((start, i))
            start, used = i, 0
        used += n
    if start < len(lengths):
        out.append((start, len(lengths)))
    return out


def check_budget(batch_tokens: int | None, batch_size: int | None) -> int:
    """The token budget of the library's ``batch_tokens`` / ``batch_size`` arguments (8192 when neither is given),
    both checked before any work."""
    if batch_tokens is None:
        batch_tokens = DEFAULT_BATCH_TOKENS if batch_size is None else UNLIMITED
    token_budget_batches([], batch_tokens, batch_size)
    return batch_tokens


def by_length(indices: Sequence[int], lengths: Sequence[int]) -> list[int]:
    """``indices`` ordered by their item's length (stable): equal lengths side by side, so that attention runs
    once per distinct length on a view."""
    return sorted(indices, key=lambda i: lengths[i])


def batches(lengths: Sequence[int], budget: int, max_items: int | None = None, sort_all: bool = False
            ) -> list[list[int]]:
    """Index lists, one per batch, each ordered by length. ``sort_all=False``: batches of consecutive items in
    arrival order (what a caller streaming its input sees first is computed first); ``sort_all=True``: the whole
    input ordered by length first (the fewest distinct lengths per batch: a job's shard)."""
    order = by_length(range(len(lengths)), lengths) if sort_all else list(range(len(lengths)))
    return [by_length(order[a:b], lengths)
            for a, b in token_budget_batches([lengths[i] for i in order], budget, max_items)]


def run_batched(run: Callable[[list], list], items: Sequence[Any], lengths: Sequence[int], budget: int,
                max_items: int | None = None, sort_all: bool = False,
                progress: Callable[[int], None] | None = None) -> list:
    """``run`` (a list of items -> one result per item, in that order) over the :func:`batches` of ``items``;
    the results in the order of ``items``. ``progress(n)`` after each batch of n items."""
    out: list = [None] * len(items)
    for idx in batches(lengths, budget, max_items, sort_all):
        for i, r in zip(idx, run([items[i] for i in idx])):
            out[i] = r
        if progress is not None:
            progress(len(idx))
    return out
