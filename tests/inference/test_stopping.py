"""`inference.stopping.BackgroundPool`: its threads end with the run, even when a job never returns."""

from __future__ import annotations

import threading
import time

from digseg_cli.inference.stopping import BackgroundPool


def test_jobs_run_in_order_and_a_shutdown_waits_for_them():
    pool = BackgroundPool(1, "test")
    futures = [pool.submit(lambda i=i: i * i) for i in range(5)]
    pool.shutdown()
    assert [f.result() for f in futures] == [0, 1, 4, 9, 16] and pool.alive == 0


def test_a_stop_cancels_queued_jobs_and_a_stuck_one_cannot_hold_the_process():
    never, started = threading.Event(), threading.Event()
    pool = BackgroundPool(1, "test")
    stuck = pool.submit(lambda: (started.set(), never.wait()))
    queued = pool.submit(lambda: "ran")
    started.wait(5)
    t0 = time.monotonic()
    pool.shutdown(wait_queued=False, timeout=0.2)
    assert time.monotonic() - t0 < 2 and queued.cancelled() and not stuck.done()
    assert all(t.daemon for t in pool._threads)  # the interpreter exits past it
    never.set()
    stuck.result(timeout=5)
    time.sleep(0.1)
    assert pool.alive == 0  # and once its job returns, the thread ends too


def test_an_exception_reaches_the_future():
    pool = BackgroundPool(2, "test")
    failing = pool.submit(lambda: 1 / 0)
    pool.shutdown()
    assert isinstance(failing.exception(), ZeroDivisionError)
