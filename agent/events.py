"""Kubernetes Events for findings: on the right object, aggregated, rate-limited, not lost.

Every finding becomes an ``events.k8s.io/v1`` Event (``core/v1`` where that group is not
served) about the Pod it concerns, or about the Node (created in ``default``).

Aggregation works like client-go's ``tools/events`` recorder, but keyed per object:
*isomorphic* findings — same ``regarding`` object, same reason, same :func:`isomorphic_key`
(the container, the firewall rule, the interface, the DNS server, …) — form one series. The
first one creates the Event; repeats only raise the series' in-memory count, written as a
``series`` patch (``count``, ``lastObservedTime``) at most once per ``flush_interval``. A
series with no repeat for ``series_idle`` seconds ends: the next repeat starts a new Event.

Rate limit: a token bucket per (object, reason) — every Event write takes a token — so an
OOM storm in one pod delays only its own writes; a finding on the node goes out at once.

Nothing is lost on an API hiccup: pending work is kept in a bounded table of series (an
update is a count, so repeats never take more room); 429/5xx/connection errors are retried
with exponential backoff and jitter, honoring ``Retry-After``; a series patch answered 404
(the Event expired or was deleted) re-creates the Event with the full count; a create answered
409 AlreadyExists (our earlier attempt went through but its answer was lost: names are
chosen once per Event) counts as created; 403 is logged once, naming the missing permission.
When the table is full, a new kind of finding is merged into the oldest pending series of the
same object and reason; only when there is none is it dropped. Outcomes are counted in
``nodediag_events_total{reason,result}``: ``created``/``updated`` (Event writes), ``failed``
(write attempts that failed; retried unless permanent), ``dropped`` (findings that will never
reach the API).
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter

from agent.event_body import (
    EVENTS_GROUP,
    MERGE_PATCH,
    Group,
    Regarding,
    event_body,
    events_path,
    isomorphic_key,
    series_patch,
)
from agent.kube import (
    Api,
    KubeError,
    KubeUnreachable,
    backoff_delay,
)
from agent.pod_lookup import PodLookup, PodRef
from collectors.finding import Finding

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Series:
    key: tuple[str, ...]
    bucket: tuple[str, ...]
    finding: Finding  # the first one: its message is the Event's note
    first_time: datetime
    last_time: datetime
    born: float
    last_seen: float
    count: int = 1
    sent: int = 0  # the count the server holds; 0: no Event yet
    name: str | None = None
    namespace: str | None = None
    group: Group | None = None
    regarding: Regarding | None = None
    on_node: bool = False  # the Pod could not be named (or its namespace is gone)
    last_write: float = float("-inf")
    not_before: float = 0.0
    attempts: int = 0
    not_found: int = 0
    force: bool = False  # flush(): write now, whatever the interval
    merged: int = 0
    candidate: str | None = None  # the name chosen for the next create, kept across retries

    @property
    def dirty(self) -> bool:
        return self.count > self.sent


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class EventSinkOptions:
    flush_interval: float = 10.0
    """Seconds between two writes of one series (repeats in between are counted)."""
    series_idle: float = 360.0
    """A series with no repeat for this long ends (client-go: 6 minutes)."""
    max_series: int = 512
    """Bound of the table of series (the queue): each is one Event and its pending count."""
    burst: int = 25
    """Token bucket per (object, reason): size (client-go's spam filter: 25) …"""
    refill_seconds: float = 10.0
    """… and seconds per new token."""
    pod_wait: float = 5.0
    """How long a Pod finding may wait for the pod watch to name its pod before it goes on
    the Node."""
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    forbidden_backoff: float = 60.0
    final_flush: float = 5.0
    """Seconds ``run`` spends writing what is pending after ``stop``."""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> EventSinkOptions:
        """Tunables for tests and experiments: ``NODEDIAG_EVENT_FLUSH_INTERVAL``,
        ``NODEDIAG_EVENT_SERIES_IDLE``, ``NODEDIAG_EVENT_BACKOFF_CAP`` (seconds)."""
        env = dict(os.environ) if env is None else env
        options = cls()
        for name, attr in (
            ("NODEDIAG_EVENT_FLUSH_INTERVAL", "flush_interval"),
            ("NODEDIAG_EVENT_SERIES_IDLE", "series_idle"),
            ("NODEDIAG_EVENT_BACKOFF_CAP", "backoff_cap"),
        ):
            if env.get(name):
                setattr(options, attr, float(env[name]))
        return options


class EventSink:
    """Findings in (``submit``, any thread, never blocks), Events out (``run``'s thread).

    ``api`` is the client or a factory of it (raising ``KubeUnreachable`` while the config
    cannot be loaded); ``pods`` names pods for ``regarding`` when a finding carries only the
    pod UID. ``clock`` (monotonic seconds), ``now`` (wall time), ``sleep`` and ``rand`` are
    injectable for tests.
    """

    def __init__(
        self,
        node: str,
        api: Api | Callable[[], Api],
        registry: CollectorRegistry | None = None,
        *,
        pods: PodLookup | None = None,
        options: EventSinkOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.node = node
        self._api: Callable[[], Api] = api if callable(api) else (lambda: api)
        self.pods = pods
        self.options = options or EventSinkOptions()
        self._clock = clock
        self._now = now
        self._sleep = sleep
        self._rand = rand
        self.instance = f"nodediag-{node}"[:128]
        self.counter = Counter(
            "nodediag_events",
            "Kubernetes Events by finding reason and result: created/updated (Event writes), "
            "failed (write attempts that failed, retried unless permanent), dropped (findings "
            "that never reach the API).",
            ["reason", "result"],
            registry=registry if registry is not None else CollectorRegistry(),
        )
        self._lock = threading.Lock()  # the table
        self._work = threading.Lock()  # one writer at a time (run's thread or flush)
        self._wake = threading.Condition(self._lock)
        self._kicked = False  # something changed since the worker last looked
        self._series: dict[tuple[str, ...], _Series] = {}
        self._buckets: dict[tuple[str, ...], _Bucket] = {}
        self.group: Group | None = None  # None: not connected (discovery pending)
        self._api_not_before = 0.0
        self._api_attempt = 0
        self._down: str | None = None  # why the API is unreachable (logged once)
        self._ever_connected = False
        self._logged_forbidden: set[tuple[str, str]] = set()
        self._logged_invalid: set[str] = set()
        self._drop_logged = 0.0

    # ----------------------------------------------------------------- input

    def submit(self, finding: Finding) -> None:
        """Take a finding: a new series, or one more in an existing one. Never blocks on I/O."""
        now = self._clock()
        when = finding.time or self._now()
        key, bucket = self._keys(finding)
        dropped = False
        with self._lock:
            series = self._series.get(key)
            if series is None and len(self._series) >= self.options.max_series:
                series = self._make_room(bucket)
                if series is None:
                    dropped = True
                else:
                    series.merged += 1
            if series is None and not dropped:
                self._series[key] = _Series(key, bucket, finding, when, when, now, now)
            elif series is not None:
                series.count += 1
                series.last_seen = now
                series.last_time = max(series.last_time, when)
            self._kicked = True
            self._wake.notify_all()
        if dropped:
            self.counter.labels(reason=finding.reason, result="dropped").inc()
            if now - self._drop_logged > 60:
                log.warning(
                    "Event queue full (%d pending series): dropped a %s finding; it is in the log",
                    self.options.max_series,
                    finding.reason,
                )
                self._drop_logged = now

    def _keys(self, finding: Finding) -> tuple[tuple[str, ...], tuple[str, ...]]:
        subject = finding.subject
        if subject.kind == "Pod" and subject.uid:
            obj: tuple[str, ...] = ("Pod", subject.uid)
        elif subject.kind == "Pod" and subject.name:
            obj = ("Pod", subject.namespace or "", subject.name)
        else:
            obj = ("Node", finding.node or self.node)
        bucket = (*obj, finding.reason)
        return (*bucket, isomorphic_key(finding)), bucket

    def _make_room(self, bucket: tuple[str, ...]) -> _Series | None:
        """Full table: forget the longest-quiet series with nothing pending; else the oldest
        pending series of the same object and reason takes the finding (merged); else
        ``None`` (drop)."""
        clean = [s for s in self._series.values() if not s.dirty]
        if clean:
            oldest = min(clean, key=lambda s: s.last_seen)
            del self._series[oldest.key]
            return None
        same = [s for s in self._series.values() if s.bucket == bucket]
        return min(same, key=lambda s: s.born) if same else None

    # ----------------------------------------------------------------- the worker

    def run(self, stop: threading.Event) -> None:
        """Write Events until ``stop``; then flush what is pending (``final_flush`` seconds)."""
        while not stop.is_set():
            with self._lock:
                self._kicked = False
            delay = self.step()
            if delay > 0:
                with self._wake:
                    # Sleeps until the next write is due or a submit/stop wakes it: an idle
                    # sink costs no wake-ups. _kicked closes the race with a submit that
                    # landed while step() ran.
                    if not stop.is_set() and not self._kicked:
                        self._wake.wait(None if math.isinf(delay) else delay)
        left = self.flush(self.options.final_flush)
        if left:
            log.warning("stopping with %d finding(s) not written as Events", left)
            with self._lock:
                for series in self._series.values():
                    if series.dirty:
                        self.counter.labels(reason=series.finding.reason, result="dropped").inc(
                            series.count - series.sent
                        )

    def wake(self) -> None:
        with self._wake:
            self._kicked = True
            self._wake.notify_all()

    def pending(self) -> int:
        """Findings not yet written to the API."""
        with self._lock:
            return sum(s.count - s.sent for s in self._series.values())

    def flush(self, timeout: float = 10.0) -> int:
        """Write every pending count now (intervals aside; backoff and rate limits still
        apply); returns what is still pending after ``timeout`` seconds."""
        deadline = self._clock() + timeout
        with self._lock:
            for series in self._series.values():
                series.force = series.dirty
        while True:
            left = self.pending()
            if not left:
                return 0
            now = self._clock()
            if now >= deadline:
                return left
            delay = self.step()
            if delay > 0:
                self._sleep(min(delay, deadline - now, 0.5))

    def step(self) -> float:
        """One unit of work (discovery or one Event write) if any is due; the seconds until
        the next is due."""
        with self._work:
            now = self._clock()
            self._end_idle(now)
            if now < self._api_not_before:
                return self._api_not_before - now
            if self.group is None:
                if not self._discover(now):
                    return max(self._api_not_before - self._clock(), 0.0)
                now = self._clock()
            series, wait = self._next_due(now)
            if series is None:
                return wait
            self._write(series, now)
            return 0.0

    # ----------------------------------------------------------------- scheduling

    def _end_idle(self, now: float) -> None:
        with self._lock:
            for key, series in list(self._series.items()):
                if not series.dirty and now - series.last_seen >= self.options.series_idle:
                    del self._series[key]

    def _tokens(self, bucket: tuple[str, ...], now: float) -> _Bucket:
        state = self._buckets.get(bucket)
        burst = float(self.options.burst)
        if state is None:
            state = self._buckets[bucket] = _Bucket(burst, now)
        gained = (now - state.updated) / self.options.refill_seconds
        state.tokens = min(burst, state.tokens + gained)
        state.updated = now
        if state.tokens >= burst and len(self._buckets) > 4 * self.options.max_series:
            self._buckets = {k: v for k, v in self._buckets.items() if v.tokens < burst}
            self._buckets[bucket] = state
        return state

    def _due(self, series: _Series, now: float) -> float:
        due = series.not_before
        if series.sent and not series.force:
            due = max(due, series.last_write + self.options.flush_interval)
        tokens = self._tokens(series.bucket, now).tokens
        if tokens < 1:
            due = max(due, now + (1 - tokens) * self.options.refill_seconds)
        return due

    def _next_due(self, now: float) -> tuple[_Series | None, float]:
        best: _Series | None = None
        best_due = float("inf")
        idle_end = float("inf")
        with self._lock:
            for series in self._series.values():
                if not series.dirty:
                    idle_end = min(idle_end, series.last_seen + self.options.series_idle)
                    continue
                due = self._due(series, now)
                # creates first (a new fault is news), then the longest waiting
                rank = (due, series.sent > 0, series.born)
                if best is None or rank < (best_due, best.sent > 0, best.born):
                    best, best_due = series, due
        if best is not None and best_due <= now:
            return best, 0.0
        return None, max(min(best_due, idle_end) - now, 0.0)

    # ----------------------------------------------------------------- API calls

    def _discover(self, now: float) -> bool:
        try:
            api = self._api()
            try:
                api.request("GET", f"/apis/{EVENTS_GROUP}/v1")
                group: Group = EVENTS_GROUP
            except KubeError as error:
                if error.status != 404:
                    raise
                group = ""
                log.info("events.k8s.io/v1 is not served: writing core/v1 Events")
        except (KubeUnreachable, KubeError) as error:
            self._api_failed(error, now)
            return False
        self.group = group
        self._api_ok()
        return True

    def _api_failed(self, error: Exception, now: float) -> None:
        retry_after = error.retry_after if isinstance(error, KubeError) else None
        delay = backoff_delay(
            self._api_attempt, self.options.backoff_base, self.options.backoff_cap, self._rand
        )
        if retry_after is not None:
            delay = max(delay, retry_after)
        self._api_attempt += 1
        self._api_not_before = now + delay
        if self._down is None:
            if self._ever_connected:
                log.warning(
                    "Kubernetes API failing (%s): holding Events, retrying with backoff", error
                )
            else:
                log.warning(
                    "Kubernetes API unreachable (%s): findings go to the log only until it "
                    "answers; retrying in the background",
                    error,
                )
        self._down = str(error)

    def _api_ok(self) -> None:
        if self._down is not None:
            log.info("Kubernetes API answers again: writing Events (%d pending)", self.pending())
        elif not self._ever_connected:
            log.info("writing %s Events", "events.k8s.io/v1" if self.group else "core/v1")
        self._down = None
        self._ever_connected = True
        self._api_attempt = 0

    def _regarding(self, series: _Series, now: float) -> Regarding | None:
        """The Event's object; ``None`` to wait for the pod watch a little longer."""
        if series.regarding is not None:
            return series.regarding
        subject = series.finding.subject
        # The node's name as its uid, as kubelet writes its own node Events: `kubectl describe
        # node` searches Events by that uid (before 1.2x only by it, newer ones by both).
        node_name = series.finding.node or self.node
        node = Regarding("Node", node_name, None, node_name)
        if subject.kind != "Pod" or series.on_node:
            return node
        if subject.name and subject.namespace:
            return Regarding("Pod", subject.name, subject.namespace, subject.uid)
        ref: PodRef | None = None
        if self.pods is not None and subject.uid:
            ref = self.pods.pod(subject.uid)
            waiting = now - series.born < self.options.pod_wait
            if ref is None and not self.pods.synced.is_set() and waiting:
                series.not_before = series.born + self.options.pod_wait
                return None
        if ref is not None:
            return Regarding("Pod", ref.name, ref.namespace, ref.uid)
        series.on_node = True  # the pod cannot be named: at least the node shows it
        return node

    def _write(self, series: _Series, now: float) -> None:
        regarding = self._regarding(series, now)
        if regarding is None:
            return
        with self._lock:
            count, last_time = series.count, series.last_time
        reason = series.finding.reason
        creating = series.name is None
        group = self.group if creating else series.group
        assert group is not None
        try:
            api = self._api()
            if creating:
                name = self._event_name(regarding, series)
                body = event_body(
                    series.finding,
                    regarding,
                    name,
                    group,
                    count,
                    first_time=series.first_time,
                    last_time=last_time,
                    instance=self.instance,
                    node=self.node,
                )
                api.request("POST", events_path(group, regarding.event_namespace), body=body)
                result = "created"
            else:
                assert series.namespace is not None and series.name is not None
                path = f"{events_path(group, series.namespace)}/{series.name}"
                api.request("PATCH", path, body=series_patch(count, last_time, group),
                            content_type=MERGE_PATCH)  # fmt: skip
                result = "updated"
        except KubeUnreachable as error:
            self._failed(series, reason)
            self._api_failed(error, now)
            return
        except KubeError as error:
            self._failed(series, reason)
            self._on_error(series, regarding, error, creating, group, now)
            return
        self._api_ok()
        self._succeeded(series, regarding, group, count, now)
        self.counter.labels(reason=reason, result=result).inc()

    def _succeeded(
        self, series: _Series, regarding: Regarding, group: Group, count: int, now: float
    ) -> None:
        with self._lock:
            series.sent = count
            series.regarding = regarding
            series.namespace = regarding.event_namespace
            series.group = group
            series.name = series.name or series.candidate
            series.last_write = now
            series.attempts = 0
            series.not_found = 0
            series.force = series.dirty and series.force
        self._tokens(series.bucket, now).tokens -= 1

    def _failed(self, series: _Series, reason: str) -> None:
        self.counter.labels(reason=reason, result="failed").inc()
        series.attempts += 1

    def _on_error(
        self,
        series: _Series,
        regarding: Regarding,
        error: KubeError,
        creating: bool,
        group: Group,
        now: float,
    ) -> None:
        status = error.status
        if status in (401, 429) or status >= 500:
            # 401: the token is being rotated or not yet valid; the client has re-read it
            self._api_failed(error, now)
        elif status == 409 and creating and error.reason == "AlreadyExists":
            # An earlier attempt did create it (its answer was lost): now patch the count.
            with self._lock:
                series.name = series.candidate
                series.regarding = regarding
                series.namespace = regarding.event_namespace
                series.group = group
                series.sent = 1
            self.counter.labels(reason=series.finding.reason, result="created").inc()
        elif status == 409:
            series.not_before = now + self._series_backoff(series)
        elif status == 404 and not creating:
            log.info(
                "Event %s/%s is gone (expired or deleted): creating it again with count %d",
                series.namespace,
                series.name,
                series.count,
            )
            with self._lock:
                series.name = series.candidate = None
                series.sent = 0
        elif status == 404:
            self._create_not_found(series, error)
        elif status == 403:
            verb = "create" if creating else "patch"
            resource = f"events{'.' + group if group else ''}"
            if (verb, resource) not in self._logged_forbidden:
                self._logged_forbidden.add((verb, resource))
                log.error(
                    "not allowed to %s %s (%s): grant the agent's service account '%s' on "
                    "'events' in API group '%s'; findings wait and retry",
                    verb,
                    resource,
                    error.message,
                    verb,
                    group,
                )
            series.not_before = now + max(
                self.options.forbidden_backoff, self._series_backoff(series)
            )
        else:
            self._drop(series, error)

    def _create_not_found(self, series: _Series, error: KubeError) -> None:
        series.not_found += 1
        if series.not_found == 1 and self.group == EVENTS_GROUP:
            self.group = None  # is events.k8s.io/v1 still served? discovery will tell
        elif not series.on_node and series.finding.subject.kind == "Pod":
            log.info(
                "namespace %s not found for a %s Event: putting it on node %s",
                series.regarding.namespace if series.regarding else "?",
                series.finding.reason,
                self.node,
            )
            series.on_node = True
            series.regarding = None
        else:
            self._drop(series, error)

    def _drop(self, series: _Series, error: KubeError) -> None:
        reason = series.finding.reason
        if reason not in self._logged_invalid:
            self._logged_invalid.add(reason)
            log.error("the API rejected a %s Event (%s): dropping it", reason, error)
        with self._lock:
            lost = series.count - series.sent
            series.sent = series.count
            if series.name is None:
                self._series.pop(series.key, None)
        self.counter.labels(reason=reason, result="dropped").inc(lost)

    def _series_backoff(self, series: _Series) -> float:
        return backoff_delay(
            series.attempts, self.options.backoff_base, self.options.backoff_cap, self._rand
        )

    # ----------------------------------------------------------------- bodies

    def _event_name(self, regarding: Regarding, series: _Series) -> str:
        """One name per Event, kept across retries (so a retried create that went through
        answers 409 AlreadyExists instead of making a duplicate)."""
        if series.candidate is None:
            stamp = f"{time.time_ns() + int(self._rand() * 1_000_000):x}"
            series.candidate = f"{regarding.name[: 252 - len(stamp)]}.{stamp}"
        return series.candidate
