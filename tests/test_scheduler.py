"""The serve Scheduler, with plain Python queues (no models): each queue's ``run(items)`` records the batches it
gets and returns ``("out", item)`` for each item. Items are ``(request, index)`` tuples, so a result names the
row it came from. Every await has a timeout, and a gated ``run`` waits at most a few seconds, so a broken
scheduler fails these tests instead of hanging them."""
from __future__ import annotations

import asyncio
import collections
import random
import threading
import time

import pytest

from padfree.serve.scheduler import Scheduler

TIMEOUT = 5.0


class Boom(RuntimeError):
    pass


class Tracker:
    """Shared by every queue of one scheduler: the calls in order, and how many ran at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls: list[tuple[str, list]] = []
        self.active = 0
        self.max_active = 0
        self.threads: set[str] = set()

    def batches(self, name: str | None = None) -> list[list]:
        return [items for q, items in self.calls if name is None or q == name]


def make_run(tracker: Tracker, name: str, *, gate: threading.Event | None = None, started: threading.Event | None = None,
             fail_on=None, delay: float = 0.0):
    """A queue's run: records the batch, holds the first call until ``gate`` is set, sleeps ``delay``, raises
    ``Boom`` when an item matches ``fail_on``, else returns ("out", item) per item."""

    def run(items):
        with tracker.lock:
            tracker.active += 1
            tracker.max_active = max(tracker.max_active, tracker.active)
            tracker.calls.append((name, list(items)))
            first = len(tracker.calls) == 1
            tracker.threads.add(threading.current_thread().name)
        try:
            if started is not None:
                started.set()
            if gate is not None and first:
                gate.wait(TIMEOUT)
            if delay:
                time.sleep(delay)
            if fail_on is not None and any(fail_on(it) for it in items):
                raise Boom(f"boom in {items!r}")
            return [("out", it) for it in items]
        finally:
            with tracker.lock:
                tracker.active -= 1

    return run


async def wait_event(ev: threading.Event) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not ev.is_set():
        assert time.monotonic() < deadline, "run was never called"
        await asyncio.sleep(0.001)


async def result(ticket):
    return await asyncio.wait_for(asyncio.shield(ticket.future), TIMEOUT)


async def stop(s):
    await asyncio.wait_for(s.stop(), TIMEOUT)


def rows(rid, n):
    return [(rid, i) for i in range(n)]


def outs(items):
    return [("out", it) for it in items]


async def gated_scheduler(budget, *, fail_on=None, on_batch=None):
    """A started scheduler with queue "q" whose first batch (request "w", one item of 1 token) is held at the
    gate; returns (scheduler, tracker, gate, the held ticket). Submit while held, then set the gate: the queue
    is full when the loop next takes."""
    tr, gate, started = Tracker(), threading.Event(), threading.Event()
    s = Scheduler(budget, on_batch=on_batch)
    s.add_queue("q", make_run(tr, "q", gate=gate, started=started, fail_on=fail_on))
    s.start()
    w = s.submit("q", [("w", 0)], [1])
    await wait_event(started)
    return s, tr, gate, w


# ---------------------------------------------------------------------------------------------- order & budget
def test_arrival_order_and_token_budget():
    async def main():
        s, tr, gate, w = await gated_scheduler(10)
        lengths = {"r1": [3, 4], "r2": [5], "r3": [12], "r4": [2, 2, 2, 2, 2, 2], "r5": [1], "r6": [10]}
        tickets = {rid: s.submit("q", rows(rid, len(ls)), ls) for rid, ls in lengths.items()}
        assert s.queued() == s.queued("q") == 12
        gate.set()
        for rid, t in tickets.items():
            assert await result(t) == outs(rows(rid, len(lengths[rid])))
        assert await result(w) == outs([("w", 0)])
        await stop(s)
        assert tr.batches() == [
            [("w", 0)],
            [("r1", 0), ("r1", 1)],                       # 3 + 4 = 7; + 5 would be 12 > 10
            [("r2", 0)],                                  # 5; + 12 would overflow
            [("r3", 0)],                                  # 12 > 10: runs alone
            [("r4", 0), ("r4", 1), ("r4", 2), ("r4", 3), ("r4", 4)],  # 10 exactly
            [("r4", 5), ("r5", 0)],                       # 3; + 10 would overflow
            [("r6", 0)],                                  # 10 exactly
        ]
        length_of = {(rid, i): n for rid, ls in lengths.items() for i, n in enumerate(ls)}
        length_of[("w", 0)] = 1
        for b in tr.batches():
            assert len(b) == 1 or sum(length_of[it] for it in b) <= 10
        assert s.queued() == 0

    asyncio.run(main())


def test_no_count_limit():
    async def main():
        s, tr, gate, w = await gated_scheduler(1000)
        t = s.submit("q", rows("big", 300), [1] * 300)
        u = s.submit("q", rows("more", 200), [2] * 200)   # 300 + 2 * 200 = 700 <= 1000
        gate.set()
        assert await result(t) == outs(rows("big", 300))
        assert await result(u) == outs(rows("more", 200))
        await stop(s)
        assert tr.batches() == [[("w", 0)], rows("big", 300) + rows("more", 200)]

    asyncio.run(main())


def test_lone_request_runs_at_once():
    async def main():
        tr = Tracker()
        s = Scheduler(100)
        s.add_queue("q", make_run(tr, "q"))
        s.start()
        await asyncio.sleep(0.01)          # the loop is idle, waiting
        t0 = time.perf_counter()
        t = s.submit("q", [("x", 0)], [3])
        assert await result(t) == [("out", ("x", 0))]
        assert time.perf_counter() - t0 < 0.25
        assert tr.batches() == [[("x", 0)]]
        assert s.queued() == 0 and not s.busy
        await stop(s)

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- split requests
def test_split_request_answered_once_when_all_rows_are_done():
    seen = []   # (batch size, the ticket was answered) after each batch, from on_batch (on the loop thread)
    holder = {}

    def on_batch(stats):
        seen.append((stats.sequences, stats.tokens, stats.error, holder["t"].future.done()))

    async def main():
        tr = Tracker()
        s = Scheduler(7, on_batch=on_batch)
        s.add_queue("q", make_run(tr, "q"))
        s.start()
        t = holder["t"] = s.submit("q", rows("a", 9), [3] * 9)
        got = await result(t)
        assert got == outs(rows("a", 9))
        assert got is t.results
        await stop(s)
        assert tr.batches() == [rows("a", 9)[k:k + 2] for k in range(0, 9, 2)]
        assert seen == [(2, 6, None, False)] * 4 + [(1, 3, None, True)]
        assert t.pending == 0 and t.next == 9

    asyncio.run(main())


def test_many_concurrent_requests_get_their_own_rows():
    rng = random.Random(1234)
    budget = 32

    async def main():
        tr = Tracker()
        s = Scheduler(budget)
        s.add_queue("q", make_run(tr, "q", delay=0.0005))
        s.start()
        expected, lengths, submitted = {}, {}, []

        async def client(rid):
            await asyncio.sleep(rng.random() * 0.02)
            n = rng.randint(1, 12)
            ls = [rng.randint(1, 40) for _ in range(n)]       # some longer than the budget
            items = rows(rid, n)
            expected[rid] = outs(items)
            lengths.update(zip(items, ls))
            t = s.submit("q", items, ls)
            submitted.extend(items)
            return rid, await result(t)

        got = await asyncio.gather(*(client(r) for r in range(60)))
        await stop(s)
        for rid, res in got:
            assert res == expected[rid]
        ran = collections.Counter(it for b in tr.batches() for it in b)
        assert set(ran) == set(lengths) and set(ran.values()) == {1}
        for b in tr.batches():
            assert len(b) == 1 or sum(lengths[it] for it in b) <= budget
        # arrival order: items run in the order they were submitted
        assert [it for b in tr.batches() for it in b] == submitted
        assert s.queued() == 0

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- load
def test_batches_grow_under_load():
    async def main():
        s, tr, gate, w = await gated_scheduler(100)
        a = s.submit("q", rows("a", 2), [5, 5])
        b = s.submit("q", rows("b", 1), [7])
        c = s.submit("q", rows("c", 3), [1, 2, 3])
        assert tr.batches() == [[("w", 0)]]               # nothing taken while the forward runs
        assert s.busy and s.queued() == 6
        gate.set()
        assert await result(a) == outs(rows("a", 2))
        assert await result(b) == outs(rows("b", 1))
        assert await result(c) == outs(rows("c", 3))
        await stop(s)
        assert tr.batches() == [[("w", 0)], rows("a", 2) + rows("b", 1) + rows("c", 3)]

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- fairness
def test_fairness_between_two_queues_and_one_forward_at_a_time():
    async def main():
        tr, gate, started = Tracker(), threading.Event(), threading.Event()
        s = Scheduler(4)
        s.add_queue("A", make_run(tr, "A", gate=gate, started=started, delay=0.002))
        s.add_queue("B", make_run(tr, "B", delay=0.002))
        s.start()
        w = s.submit("A", [("A0", 0)], [1])
        await wait_event(started)
        ta = [s.submit("A", rows(f"A{k}", 4), [1] * 4) for k in (1, 2, 3)]
        tb = [s.submit("B", rows(f"B{k}", 4), [1] * 4) for k in (1, 2, 3, 4, 5)]
        assert s.queued("A") == 12 and s.queued("B") == 20 and s.queued() == 32
        gate.set()
        for t in [w, *ta, *tb]:
            await result(t)
        await stop(s)
        assert [(q, items[0][0]) for q, items in tr.calls] == [
            ("A", "A0"), ("B", "B1"), ("A", "A1"), ("B", "B2"), ("A", "A2"), ("B", "B3"), ("A", "A3"),
            ("B", "B4"), ("B", "B5")]
        assert all(items == rows(items[0][0], 4) for q, items in tr.calls[1:])
        assert tr.max_active == 1
        assert len(tr.threads) == 1

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- cancellation
def test_cancelled_before_compute_runs_nothing():
    async def main():
        s, tr, gate, w = await gated_scheduler(100)
        x = s.submit("q", rows("x", 3), [1, 1, 1])
        y = s.submit("q", rows("y", 2), [1, 1])
        z = s.submit("q", rows("z", 1), [1])
        assert s.queued() == 6
        y.cancel()
        assert y.done and y.future.cancelled()
        gate.set()
        assert await result(x) == outs(rows("x", 3))
        assert await result(z) == outs(rows("z", 1))
        await stop(s)
        assert tr.batches() == [[("w", 0)], rows("x", 3) + rows("z", 1)]
        assert s.queued() == 0 and s.queued("q") == 0

    asyncio.run(main())


def test_cancelled_alone_in_its_queue_is_dropped():
    async def main():
        s, tr, gate, w = await gated_scheduler(100)
        y = s.submit("q", rows("y", 4), [1] * 4)
        y.cancel()
        assert s.queued() == 4              # counted until the loop drops it
        gate.set()
        await result(w)
        await stop(s)
        assert tr.batches() == [[("w", 0)]]
        assert s.queued() == 0

    asyncio.run(main())


def test_cancelled_after_part_ran_runs_no_more():
    async def main():
        tr, gate, started = Tracker(), threading.Event(), threading.Event()
        s = Scheduler(2)
        s.add_queue("q", make_run(tr, "q", gate=gate, started=started))
        s.start()
        t = s.submit("q", rows("t", 6), [1] * 6)
        u = s.submit("q", rows("u", 1), [1])
        await wait_event(started)
        assert tr.batches() == [rows("t", 2)] and s.queued() == 5
        t.cancel()
        gate.set()
        assert await result(u) == outs(rows("u", 1))
        await stop(s)
        assert tr.batches() == [rows("t", 2), rows("u", 1)]
        assert t.future.cancelled()
        assert s.queued() == 0

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- failure
def test_failing_forward_fails_exactly_its_tickets():
    stats = []

    async def main():
        s, tr, gate, w = await gated_scheduler(4, fail_on=lambda it: it == ("b", 0), on_batch=stats.append)
        a = s.submit("q", rows("a", 2), [1, 1])
        b = s.submit("q", rows("b", 5), [1] * 5)     # b0 fails the batch a0 a1 b0 b1; b2..b4 must not run
        c = s.submit("q", rows("c", 2), [1, 1])
        gate.set()
        with pytest.raises(Boom) as ea:
            await result(a)
        with pytest.raises(Boom) as eb:
            await result(b)
        assert ea.value is eb.value
        assert await result(c) == outs(rows("c", 2))
        assert await result(w) == outs([("w", 0)])
        # the loop goes on serving
        d = s.submit("q", rows("d", 3), [1, 1, 1])
        assert await result(d) == outs(rows("d", 3))
        await stop(s)
        assert tr.batches() == [[("w", 0)], rows("a", 2) + rows("b", 2), rows("c", 2), rows("d", 3)]
        assert [(st.sequences, st.tokens) for st in stats] == [(1, 1), (4, 4), (2, 2), (3, 3)]
        assert [st.error for st in stats] == [None, ea.value, None, None]
        assert s.queued() == 0

    asyncio.run(main())


def test_wrong_number_of_results_fails_the_batch():
    async def main():
        s = Scheduler(10)
        s.add_queue("q", lambda items: items[:-1])
        s.start()
        t = s.submit("q", [1, 2], [1, 1])
        with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
            await result(t)
        await stop(s)

    asyncio.run(main())


def test_failing_on_batch_does_not_stop_the_loop():
    stats = []

    def on_batch(st):
        stats.append(st)
        if len(stats) == 1:
            raise ValueError("metrics broke")

    async def main():
        tr = Tracker()
        s = Scheduler(8, on_batch=on_batch)
        s.add_queue("q", make_run(tr, "q"))
        s.start()
        assert await result(s.submit("q", rows("a", 2), [1, 1])) == outs(rows("a", 2))
        assert await result(s.submit("q", rows("b", 1), [1])) == outs(rows("b", 1))
        await stop(s)
        assert tr.batches() == [rows("a", 2), rows("b", 1)]
        assert len(stats) == 2

    asyncio.run(main())


def test_run_raising_stop_iteration_fails_its_batch():
    async def main():
        def run(items):
            if ("bad", 0) in items:
                next(iter([]))                      # StopIteration escapes run
            return outs(items)

        s = Scheduler(1)
        s.add_queue("q", run)
        s.start()
        bad = s.submit("q", rows("bad", 2), [1, 1])
        good = s.submit("q", rows("good", 1), [1])
        with pytest.raises(RuntimeError, match="StopIteration"):
            await result(bad)
        assert await result(good) == outs(rows("good", 1))
        await stop(s)

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- stop
def test_stop_drains_every_queued_request():
    async def main():
        s, tr, gate, w = await gated_scheduler(3)
        tickets = [s.submit("q", rows(f"r{k}", k + 1), [1] * (k + 1)) for k in range(5)]
        stopping = asyncio.ensure_future(s.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done()                 # the first forward is still held
        gate.set()
        await asyncio.wait_for(stopping, TIMEOUT)
        assert w.future.done() and all(t.future.done() for t in tickets)
        for k, t in enumerate(tickets):
            assert t.future.result() == outs(rows(f"r{k}", k + 1))
        assert sum(len(b) for b in tr.batches()) == 1 + 15
        assert s.queued() == 0 and not s.busy

    asyncio.run(main())


def test_stop_waits_for_the_running_forward():
    async def main():
        s, tr, gate, w = await gated_scheduler(3)
        assert s.queued() == 0 and s.busy             # nothing queued, one forward running
        stopping = asyncio.ensure_future(s.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done() and not w.future.done()
        gate.set()
        await asyncio.wait_for(stopping, TIMEOUT)
        assert w.future.result() == outs([("w", 0)])
        assert not s.busy

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [0, -1, True, False, 1.5, "8", None])
def test_bad_max_batch_tokens(bad):
    with pytest.raises(ValueError):
        Scheduler(bad)


def test_submit_validation_and_empty_request():
    async def main():
        tr = Tracker()
        s = Scheduler(8)
        s.add_queue("q", make_run(tr, "q"))
        with pytest.raises(ValueError):
            s.add_queue("q", make_run(tr, "q"))
        with pytest.raises(RuntimeError):
            s.submit("q", [1], [1])                 # not started
        s.start()
        with pytest.raises(KeyError):
            s.submit("nope", [1], [1])
        with pytest.raises(ValueError):
            s.submit("q", [1, 2], [1])
        with pytest.raises(ValueError):
            s.submit("q", [1], [1, 2])
        assert s.queued() == 0
        e = s.submit("q", [], [])
        assert e.future.done() and e.future.result() == []
        await asyncio.sleep(0.01)
        await stop(s)
        assert tr.calls == []

    asyncio.run(main())
