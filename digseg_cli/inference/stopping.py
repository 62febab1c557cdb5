"""How a long run stops: SIGINT and SIGTERM become a flag it checks between items, and its I/O threads end with it.

One job: `StopSignals` turns the first SIGINT or SIGTERM into `requested` (the run finishes the item in hand,
writes what it did and exits 130; a second signal stops at once with `KeyboardInterrupt`), and
`BackgroundPool` runs reads and writes on daemon threads that a stop event and a join end on every path, so
neither a blocked thread nor a queued job keeps the process alive after the run.

It knows nothing of images, models or files: `train.loop` and `segment.run` use it for their own loops.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class StopSignals:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step (then it saves and exits 130)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue  # ignored by whoever started us (a background job, nohup): it stays ignored
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread): no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


_DONE = None  # the sentinel that ends one worker


class BackgroundPool:
    """`workers` daemon threads running submitted calls in order, each answered through a `Future`.

    `shutdown(wait_queued=False)` sets the stop event: queued calls are cancelled, running ones finish (they
    are one read or one write) and the threads are joined for at most `timeout` seconds. Daemon threads mean
    that even a call that never returns cannot keep the interpreter from exiting.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._closed:
            raise RuntimeError("the pool is shut down")
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not _DONE:
            future, fn, args = item
            if self._stop.is_set():
                future.cancel()
                continue
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)

    def shutdown(self, *, wait_queued: bool = True, timeout: float | None = None) -> None:
        """End the threads: after the queued calls (`wait_queued`), or cancelling them; join up to `timeout` s."""
        self._closed = True
        if not wait_queued:
            self._stop.set()
            while True:  # cancel what waits now: a worker stuck in its job would only see it later
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _DONE:
                    item[0].cancel()
        for _ in self._threads:
            self._queue.put(_DONE)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def alive(self) -> int:
        """How many of the threads are still running (0 after a completed shutdown)."""
        return sum(t.is_alive() for t in self._threads)
