"""The Scheduler: one owner of every model's queue in a process, batching by a budget of real tokens.

Callers (HTTP routes, jobs) :meth:`Scheduler.submit` a request's sequences with their token counts and await its
:class:`Ticket`. A single compute loop (an asyncio task) takes queued sequences in arrival order until the next
one would overflow ``max_batch_tokens`` real tokens (no count limit, no fixed delay: under load batches grow by
themselves, at low load a lone request runs at once; a sequence longer than the budget runs alone), runs one
forward at a time on one worker thread (so models never fight for the cores) while the event loop keeps
accepting, and hands each ticket its own rows. A request may be split across batches; it is answered when all
its rows are done. With several models, the loop serves their queues in turn, one batch each. A cancelled ticket
(its client left) is skipped before compute. A failing forward fails the tickets in that batch (the rest of
their rows are dropped) and the loop goes on.

The scheduler knows nothing of HTTP, tokenizers or models: a queue is a name and a ``run(items) -> results``
callable, called on the worker thread.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..batching import fits, positive_int

log = logging.getLogger("padfree.serve")


@dataclass
class BatchStats:
    """What one batch was, for metrics and logs."""
    queue: str
    sequences: int
    tokens: int
    seconds: float          # the forward (run) alone
    error: BaseException | None = None


class Ticket:
    """One submitted request: its items, where each result goes, and its timings."""

    def __init__(self, queue: str, items: Sequence[Any], lengths: Sequence[int], future: asyncio.Future):
        self.queue = queue
        self.items = list(items)
        self.lengths = list(lengths)
        self.results: list[Any] = [None] * len(self.items)
        self.future = future
        self.next = 0                       # first item not yet taken into a batch
        self.pending = len(self.items)      # items taken or not whose result has not come back
        self.submitted = time.perf_counter()
        self.started: float | None = None   # when its first batch started
        self.inference_s = 0.0              # time in the forwards that carried its items

    @property
    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> None:
        """Drop what is not computed yet (the client left); the future is cancelled."""
        if not self.future.done():
            self.future.cancel()

    @property
    def queue_s(self) -> float:
        return (self.started or time.perf_counter()) - self.submitted


@dataclass
class _Queue:
    run: Callable[[list[Any]], Sequence[Any]]
    tickets: collections.deque = field(default_factory=collections.deque)
    sequences: int = 0                      # queued items not yet taken


def _call_run(run: Callable[[list[Any]], Sequence[Any]], items: list[Any]) -> Sequence[Any]:
    """Call a queue's run on the worker. asyncio cannot set StopIteration on a Future (the future would never
    resolve, and the compute loop would wait on it forever), so it comes back as a RuntimeError."""
    try:
        return run(items)
    except StopIteration as e:
        raise RuntimeError(f"run raised StopIteration: {e!r}") from e


class Scheduler:
    """See the module docstring. Every method but the worker's ``run`` calls runs on the event loop thread."""

    def __init__(self, max_batch_tokens: int, on_batch: Callable[[BatchStats], None] | None = None):
        positive_int("max_batch_tokens", max_batch_tokens)
        self.max_batch_tokens = max_batch_tokens
        self.on_batch = on_batch
        self._queues: dict[str, _Queue] = {}
        self._turn = itertools.cycle([])
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="padfree-forward")
        self._running = False               # a forward is in progress

    def add_queue(self, name: str, run: Callable[[list[Any]], Sequence[Any]]) -> None:
        if name in self._queues:
            raise ValueError(f"queue {name!r} exists")
        self._queues[name] = _Queue(run)
        self._turn = itertools.cycle(list(self._queues))

    def queued(self, name: str | None = None) -> int:
        """Sequences waiting (not yet in a batch), in one queue or in all."""
        if name is not None:
            return self._queues[name].sequences
        return sum(q.sequences for q in self._queues.values())

    @property
    def busy(self) -> bool:
        return self._running or self.queued() > 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the compute loop on the running event loop."""
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._compute_loop(), name="padfree-compute")

    async def stop(self) -> None:
        """Stop the compute loop once every queued sequence has run (a graceful drain), then the worker."""
        while self.busy and self._loop_task is not None and not self._loop_task.done():
            await asyncio.sleep(0.01)
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        self._worker.shutdown(wait=True)

    # ------------------------------------------------------------------ requests
    def submit(self, name: str, items: Sequence[Any], lengths: Sequence[int]) -> Ticket:
        """Queue a request's items (with their token counts); await ``ticket.future`` for the results, in
        item order. ``KeyError`` for an unknown queue."""
        if len(items) != len(lengths):
            raise ValueError(f"got {len(items)} items and {len(lengths)} lengths")
        if self._loop_task is None:
            raise RuntimeError("the scheduler is not started")
        q = self._queues[name]
        ticket = Ticket(name, items, lengths, asyncio.get_running_loop().create_future())
        if not ticket.items:
            ticket.future.set_result([])
            return ticket
        q.tickets.append(ticket)
        q.sequences += len(ticket.items)
        self._wake.set()
        return ticket

    def _take(self, q: _Queue) -> list[tuple[Ticket, int]]:
        """Pop items in arrival order until the next would overflow the budget (at least one item)."""
        taken, used = [], 0
        while q.tickets:
            t = q.tickets[0]
            if t.done:  # cancelled or failed: its remaining items are dropped
                q.tickets.popleft()
                q.sequences -= len(t.items) - t.next
                continue
            n = t.lengths[t.next]
            if not fits(used, n, self.max_batch_tokens):
                break
            taken.append((t, t.next))
            used += n
            t.next += 1
            q.sequences -= 1
            if t.next == len(t.items):
                q.tickets.popleft()
        return taken

    def _next_batch(self) -> tuple[str, list[tuple[Ticket, int]]] | None:
        for _ in range(len(self._queues)):
            name = next(self._turn)
            taken = self._take(self._queues[name])
            if taken:
                return name, taken
        return None

    async def _compute_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            nxt = self._next_batch()
            if nxt is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            name, taken = nxt
            now = time.perf_counter()
            for t, _ in taken:
                if t.started is None:
                    t.started = now
            items = [t.items[i] for t, i in taken]
            tokens = sum(t.lengths[i] for t, i in taken)
            self._running = True
            error = None
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._worker, _call_run, self._queues[name].run, items)
                if len(results) != len(items):
                    raise RuntimeError(f"queue {name!r} returned {len(results)} results for {len(items)} items")
            except Exception as e:  # the batch's requests fail; the loop goes on
                error = e
            finally:
                self._running = False
            seconds = time.perf_counter() - t0
            self._deliver(taken, None if error else results, error, seconds)
            stats = BatchStats(name, len(items), tokens, seconds, error)
            log.debug("batch %s: %d sequences, %d tokens, %.1f ms%s", name, len(items), tokens, seconds * 1e3,
                      f", failed: {error!r}" if error else "")
            if self.on_batch is not None:
                try:
                    self.on_batch(stats)
                except Exception:  # a broken metrics hook must not stop the loop (every later request would hang)
                    log.exception("on_batch failed for a batch of %s", name)

    @staticmethod
    def _deliver(taken, results, error, seconds) -> None:
        for t in {id(t): t for t, _ in taken}.values():
            t.inference_s += seconds
        for k, (t, i) in enumerate(taken):
            if t.done:
                continue
            if error is not None:
                t.future.set_exception(error)
                continue
            t.results[i] = results[k]
            t.pending -= 1
            if t.pending == 0:
                t.future.set_result(t.results)
