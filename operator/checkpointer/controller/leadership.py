"""The controller's leader election: one replica schedules, the others stand by.

A coordination.k8s.io/v1 Lease names the leader. Every write of it carries the resourceVersion it was
read at, so of two candidates that saw the same expired Lease only one can win. The leader renews it;
when it cannot renew before the Lease would expire it exits at once, before a standby may take the
Lease over, so no object is ever handled by two controllers. On a graceful stop it gives the Lease
up, so that a standby takes over without waiting for it to expire.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import kubernetes
import urllib3
from kubernetes.client import ApiException

from checkpointer.adapters.kube import Kube
from checkpointer.settings import Settings

log = logging.getLogger(__name__)

LEASE_NAME = "checkpointer-controller"
# The exit status of a leader that could not renew in time; any restart comes back as a standby.
EXIT_LEASE_LOST = 3
# A leader stops this long before its Lease could expire: exiting and in-flight requests take time.
FENCE_MARGIN_SECONDS = 0.5
# Errors of the connection or of the API server that the next attempt may not meet again.
TRANSIENT = (ApiException, urllib3.exceptions.HTTPError, OSError)


def may_acquire(
    holder: str | None, renewed: datetime.datetime | None, duration: float, now: datetime.datetime, me: str
) -> bool:
    """Whether `me` may take the Lease: nobody holds it, it is already ours, or its holder let it expire."""
    if not holder or holder == me:
        return True
    if renewed is None:
        return True
    return renewed + datetime.timedelta(seconds=duration) < now


def identity(settings: Settings) -> str:
    return settings.pod_name or f"{socket.gethostname()}-{os.getpid()}"


def _now() -> datetime.datetime:
    now = datetime.datetime.now(datetime.UTC)
    # The client writes times with isoformat(), which leaves out a zero fraction, and the API
    # server's MicroTime accepts only times with one.
    return now if now.microsecond else now.replace(microsecond=1)


def _exit(message: str) -> None:
    log.critical(message)
    logging.shutdown()
    sys.stderr.flush()
    # Not sys.exit: that waits for the handler threads, which would go on acting without the Lease.
    os._exit(EXIT_LEASE_LOST)


class Leadership:
    """The Lease as seen by one candidate; the leader's renewals and its self-fencing run in threads."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        me: str,
        duration: float,
        renew_every: float,
        *,
        fence: Callable[[str], None] = _exit,
        clock: Callable[[], datetime.datetime] = _now,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.me = me
        self.duration = duration
        self.renew_every = renew_every
        self.fence = fence
        self.clock = clock
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        # Of the last write of ours that succeeded: what the next one must build on.
        self._version: str | None = None
        self._acquired: datetime.datetime | None = None
        self._transitions = 0
        # The renewTime of the last renewal whose answer did not come back: it may have been written.
        self._unanswered: datetime.datetime | None = None
        # Monotonic time by which a renewal must have succeeded.
        self._deadline = 0.0
        # The holder and expiry the last look at the Lease found.
        self.holder: str | None = None
        self.expires: datetime.datetime | None = None

    @classmethod
    def for_settings(cls, kube: Kube, settings: Settings) -> Leadership:
        return cls(
            kube,
            settings.namespace,
            identity(settings),
            settings.leader_lease_duration_seconds,
            settings.leader_renew_seconds,
        )

    @property
    def leading(self) -> bool:
        return self._version is not None and not self._stopped.is_set()

    # --- standing by ----------------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Take the Lease if it is free; False (with `holder` set) when someone else keeps it."""
        lease = self.kube.read_lease(self.namespace, LEASE_NAME)
        started = time.monotonic()
        now = self.clock()
        if lease is None:
            body = self._body(now, acquired=now, transitions=0, version=None)
            try:
                written = self.kube.create_lease(self.namespace, body)
            except ApiException as e:
                if e.status != 409:
                    raise
                return self._lost_race()
            self._took(written, started)
            return True
        spec = lease.spec
        holder = spec.holder_identity if spec else None
        renewed = (spec.renew_time or spec.acquire_time) if spec else None
        duration = float((spec.lease_duration_seconds if spec else None) or 0)
        self.holder = holder
        self.expires = renewed + datetime.timedelta(seconds=duration) if renewed else None
        if not may_acquire(holder, renewed, duration, now, self.me):
            return False
        ours = holder == self.me
        transitions = (spec.lease_transitions if spec else None) or 0
        body = self._body(
            now,
            acquired=(spec.acquire_time if spec and ours else None) or now,
            transitions=transitions if ours else transitions + 1,
            version=lease.metadata.resource_version if lease.metadata else None,
        )
        try:
            written = self.kube.replace_lease(self.namespace, LEASE_NAME, body)
        except ApiException as e:
            if e.status not in (404, 409):
                raise
            return self._lost_race()
        self._took(written, started)
        return True

    def wait_until_leader(self, stopping: threading.Event) -> bool:
        """Stand by until the Lease is ours (True) or `stopping` is set (False)."""
        reported: str | None = None
        while not stopping.is_set():
            try:
                if self.try_acquire():
                    log.info("leading: the controller Lease %s/%s is held by %s", self.namespace, LEASE_NAME, self.me)
                    return True
            except TRANSIENT as e:
                log.warning("could not read or write the controller Lease (retrying): %s", e)
            else:
                if self.holder != reported:
                    log.info("standing by: the controller Lease is held by %s", self.holder)
                    reported = self.holder
            stopping.wait(self._next_look())
        return False

    def _next_look(self) -> float:
        # Look again right after the holder's Lease would expire, when that comes before the next poll.
        if self.expires is None:
            return self.renew_every
        left = (self.expires - self.clock()).total_seconds()
        return max(0.05, min(self.renew_every, left + 0.05))

    def _lost_race(self) -> bool:
        lease = self.kube.read_lease(self.namespace, LEASE_NAME)
        self.holder = lease.spec.holder_identity if lease and lease.spec else None
        self.expires = None
        return False

    # --- leading --------------------------------------------------------------------------------

    def _body(
        self, now: datetime.datetime, *, acquired: datetime.datetime, transitions: int, version: str | None
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": LEASE_NAME,
            "namespace": self.namespace,
            "labels": {"app.kubernetes.io/name": "checkpointer", "app.kubernetes.io/component": "controller"},
        }
        if version is not None:
            metadata["resourceVersion"] = version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": self.me,
                "leaseDurationSeconds": math.ceil(self.duration),
                "acquireTime": acquired,
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }

    def _took(self, lease: kubernetes.client.V1Lease, started: float) -> None:
        self._remember(lease, started)
        self.holder = self.me
        for target, name in ((self._renew_loop, "lease-renewal"), (self._watchdog, "lease-watchdog")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _remember(self, lease: kubernetes.client.V1Lease, started: float) -> None:
        with self._lock:
            self._version = lease.metadata.resource_version if lease.metadata else None
            self._acquired = lease.spec.acquire_time if lease.spec else None
            self._transitions = (lease.spec.lease_transitions if lease.spec else None) or 0
            # A standby may take the Lease once renewTime (written just after `started`) plus its
            # duration has passed.
            self._deadline = started + self.duration - FENCE_MARGIN_SECONDS

    def renew(self) -> None:
        """One renewal; raises what failed. A Lease taken by someone else fences at once."""
        started = time.monotonic()
        now = self.clock()
        with self._lock:
            body = self._body(now, acquired=self._acquired or now, transitions=self._transitions, version=self._version)
            left = self._deadline - started
        if left <= 0:
            return  # the watchdog fences
        try:
            written = self.kube.replace_lease(self.namespace, LEASE_NAME, body, timeout=left)
        except ApiException as e:
            if e.status in (404, 409):
                self._changed_under_us()
                return
            self._unanswered = now
            raise
        except TRANSIENT:
            self._unanswered = now
            raise
        self._remember(written, started)

    def _changed_under_us(self) -> None:
        lease = self.kube.read_lease(self.namespace, LEASE_NAME)
        spec = lease.spec if lease else None
        # A write of ours whose answer was lost also changes the resourceVersion: then the Lease
        # carries our holder and the renewTime we wrote, and it is still ours. The deadline stays
        # that of the last answered renewal (the earlier one); the next renewal moves it on.
        if (
            lease is not None
            and spec is not None
            and spec.holder_identity == self.me
            and spec.renew_time == self._unanswered
        ):
            with self._lock:
                self._version = lease.metadata.resource_version if lease.metadata else None
            return
        holder = spec.holder_identity if spec else None
        self._stop_acting(f"the controller Lease was taken over by {holder or 'nobody'}: stopping, a standby leads")

    def _renew_loop(self) -> None:
        while not self._stopped.wait(self.renew_every):
            try:
                self.renew()
            except TRANSIENT as e:
                with self._lock:
                    left = self._deadline - time.monotonic()
                log.warning("renewing the controller Lease failed (%.1fs left): %s", left, e)

    def _watchdog(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                left = self._deadline - time.monotonic()
            if left <= 0:
                self._stop_acting(
                    f"the controller Lease could not be renewed within {self.duration:g}s: stopping before "
                    "a standby may take it over"
                )
                return
            self._stopped.wait(min(left, 0.1))

    def _stop_acting(self, message: str) -> None:
        self._stopped.set()
        self.fence(message)

    def release(self) -> None:
        """Stop renewing and give the Lease up, so that a standby takes over without waiting for it to expire."""
        if self._version is None or self._stopped.is_set():
            return
        self._stopped.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        now = self.clock()
        with self._lock:
            body = self._body(now, acquired=self._acquired or now, transitions=self._transitions, version=self._version)
            self._version = None
        del body["spec"]["holderIdentity"]
        try:
            self.kube.replace_lease(self.namespace, LEASE_NAME, body, timeout=self.renew_every)
        except TRANSIENT as e:
            log.warning("could not give the controller Lease up; a standby takes over once it expires: %s", e)
            return
        log.info("gave the controller Lease up")


class _Healthz(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/healthz":
            self.send_error(404)
            return
        body = b'{"standby": true}\n'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a probe every few seconds would fill the log


def stand_by(leadership: Leadership, health_port: int, health_host: str = "0.0.0.0") -> bool:
    """Block until this process leads (True), or until SIGTERM or SIGINT come first (False).

    The liveness endpoint answers meanwhile, so a standby's probes pass; it closes once the Lease is
    ours, for kopf's endpoint to take the port over.
    """
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    server: ThreadingHTTPServer | None = None
    try:
        if health_port:
            server = ThreadingHTTPServer((health_host, health_port), _Healthz)
            threading.Thread(target=server.serve_forever, name="standby-healthz", daemon=True).start()
        leading = leadership.wait_until_leader(stopping)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if leading and stopping.is_set():
        leadership.release()
        return False
    return leading
