"""Worker threads that survive their own errors, and say so.

Every long-running thread of ``nodediag run`` (Event sink, pod watch, collectors, series
expiry, VXLAN fix) runs its loop under a :class:`Supervisor`: an exception that escapes the
loop is logged (once per different error: a loop failing the same way every few seconds does
not flood the log), counted in ``nodediag_thread_errors_total{thread}``, and the loop is
started again after a backoff with jitter (1 s doubling to 60 s). A loop that ran for
``stable_seconds`` since its last restart counts as recovered. One that keeps failing —
``max_failures`` restarts in a row without recovering — makes :meth:`Supervisor.health` fail,
so ``/healthz`` fails and kubelet restarts the pod: a restart is the last remedy left.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter

from agent.kube import backoff_delay

log = logging.getLogger(__name__)

Loop = Callable[[threading.Event], None]


@dataclass
class _Worker:
    name: str
    thread: threading.Thread | None = None
    failures: int = 0  # restarts in a row without a stable run
    last_error: str | None = None
    started: float = 0.0
    finished: bool = False  # the loop returned: its work is over
    lock: threading.Lock = field(default_factory=threading.Lock)


class Supervisor:
    """Starts loops on daemon threads and restarts them when they raise."""

    def __init__(
        self,
        registry: CollectorRegistry | None,
        stop: threading.Event,
        *,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        stable_seconds: float = 120.0,
        max_failures: int = 5,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.stop = stop
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.stable_seconds = stable_seconds
        self.max_failures = max_failures
        self._clock = clock
        self._rand = rand
        self._workers: list[_Worker] = []
        self.errors = Counter(
            "nodediag_thread_errors",
            "Uncaught errors in the agent's worker threads (each was restarted after a backoff).",
            ["thread"],
            registry=registry if registry is not None else CollectorRegistry(),
        )

    def start(self, name: str, loop: Loop) -> threading.Thread:
        """Run ``loop(stop)`` on a thread named ``name``, again after each uncaught error."""
        worker = _Worker(name)
        self.errors.labels(thread=name)  # the series exists at 0 from the start
        thread = threading.Thread(target=self._run, args=(worker, loop), name=name, daemon=True)
        worker.thread = thread
        self._workers.append(worker)
        thread.start()
        return thread

    def threads(self) -> list[threading.Thread]:
        return [w.thread for w in self._workers if w.thread is not None]

    def health(self) -> tuple[bool, str]:
        """``(False, why)`` when a worker keeps failing or died; else ``(True, summary)``."""
        bad: list[str] = []
        now = self._clock()
        for worker in self._workers:
            with worker.lock:
                if self._recovered(worker, now):
                    worker.failures = 0
                alive = worker.thread is not None and worker.thread.is_alive()
                if worker.failures >= self.max_failures:
                    bad.append(
                        f"thread {worker.name} failed {worker.failures} times in a row "
                        f"(last: {worker.last_error})"
                    )
                elif not alive and not worker.finished and not self.stop.is_set():
                    bad.append(f"thread {worker.name} is not running")
        if bad:
            return False, "; ".join(bad)
        return True, f"{len(self._workers)} worker threads running"

    def _recovered(self, worker: _Worker, now: float) -> bool:
        return worker.failures > 0 and now - worker.started >= self.stable_seconds

    def _run(self, worker: _Worker, loop: Loop) -> None:
        while not self.stop.is_set():
            with worker.lock:
                worker.started = self._clock()
            try:
                loop(self.stop)
            except Exception as error:  # any error: the thread must live on
                delay = self._failed(worker, error)
                self.stop.wait(delay)
                continue
            with worker.lock:
                worker.finished = True
            return

    def _failed(self, worker: _Worker, error: Exception) -> float:
        text = f"{type(error).__name__}: {error}"
        self.errors.labels(thread=worker.name).inc()
        with worker.lock:
            if self._recovered(worker, self._clock()):
                worker.failures = 0
            delay = backoff_delay(worker.failures, self.backoff_base, self.backoff_cap, self._rand)
            worker.failures += 1
            repeated = text == worker.last_error
            worker.last_error = text
        if repeated:
            log.debug("thread %s failed again (%s); restarting in %.1fs", worker.name, text, delay)
        else:
            log.error(
                "thread %s failed (%s); restarting it in %.1fs",
                worker.name,
                text,
                delay,
                exc_info=error,
            )
        return delay
