"""The tests' own client of the API server: reads, lists, watches and server-side applies, in process.

A `kubectl` run costs a process and a TLS handshake, about a tenth of a second of CPU on a small
machine, and the tests ask about objects thousands of times a session. This client keeps one
connection per thread and asks the API server directly; waits watch the object instead of polling
it. `kubectl` stays what the tests run where kubectl itself, a user's kubeconfig or its output is
what they check.
"""

from __future__ import annotations

import http.client
import json
import math
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from localenv.procs import LocalEnvError

# Errors after which the next attempt may succeed: the API server restarting, a connection it closed.
TRANSIENT = (OSError, http.client.HTTPException)
# How long a wait sleeps before it asks again after such an error.
RETRY_SECONDS = 0.2


@dataclass(frozen=True)
class Resource:
    """A resource as discovery describes it: where it lives and whether it is namespaced."""

    group_version: str  # "v1" or "<group>/<version>"
    plural: str
    kind: str
    namespaced: bool

    @property
    def base(self) -> str:
        return "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"

    def path(self, namespace: str | None, name: str = "") -> str:
        where = f"{self.base}/namespaces/{namespace}/{self.plural}" if self.namespaced and namespace else ""
        path = where or f"{self.base}/{self.plural}"
        return f"{path}/{urllib.parse.quote(name)}" if name else path


class ApiError(LocalEnvError):
    """The API server answered a request with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Api:
    """The API server at `server`, as the client certificate in `context` (admin)."""

    def __init__(self, server: str, context: ssl.SSLContext) -> None:
        parsed = urllib.parse.urlsplit(server)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 443
        self.context = context
        self._local = threading.local()
        self._lock = threading.Lock()  # of the kept connections
        self._discovery = threading.Lock()
        self._resources: dict[str, Resource] = {}
        # Every thread's connection, so that close() ends them all (a thread's own may outlive the thread).
        self._kept: list[http.client.HTTPSConnection] = []

    # --- requests --------------------------------------------------------------------------------

    def _connection(self, timeout: float) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=timeout)

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        """(status, decoded JSON answer) of one request, on this thread's kept-alive connection."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json", **({"Content-Type": content_type} if data is not None else {})}
        for attempt in (1, 2):
            conn: http.client.HTTPSConnection | None = getattr(self._local, "conn", None)
            if conn is None or conn not in self._kept:  # none yet on this thread, or closed by close()
                conn = self._local.conn = self._connection(60)
                with self._lock:
                    self._kept.append(conn)
            try:
                conn.request(method, path, body=data, headers=headers)
                reply = conn.getresponse()
                raw = reply.read()
            except TRANSIENT:
                self._drop(conn)
                if attempt == 2:
                    raise
                continue  # a kept-alive connection the server closed meanwhile: once more, on a new one
            try:
                return reply.status, json.loads(raw) if raw else {}
            except ValueError:  # not JSON: an error page of a server that is starting or stopping
                return reply.status, {"message": raw[:500].decode(errors="replace")}
        raise AssertionError("unreachable")

    def _drop(self, conn: http.client.HTTPSConnection) -> None:
        conn.close()
        self._local.conn = None
        with self._lock:
            if conn in self._kept:
                self._kept.remove(conn)

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            kept, self._kept = self._kept, []
        for conn in kept:
            conn.close()

    def _checked(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        status, answer = self.request(method, path, body, content_type)
        if status >= 400:
            raise ApiError(status, f"{method} {path}: {status} {answer.get('message') or answer}")
        return answer

    # --- discovery -------------------------------------------------------------------------------

    def resource(self, name: str) -> Resource:
        """The resource kubectl would take `name` for: plural, singular, short name or kind, optionally
        with `.group`; discovery is asked again for a name it did not know (a CRD installed since)."""
        key = name.lower()
        with self._discovery:
            found = self._resources.get(key)
            if found is None:
                self._resources = self._discover()
                found = self._resources.get(key)
        if found is None:
            raise ApiError(404, f'the server doesn\'t have a resource type "{name}"')
        return found

    def _discover(self) -> dict[str, Resource]:
        found: dict[str, Resource] = {}
        versions = ["v1"] + [
            g["preferredVersion"]["groupVersion"] for g in self._checked("GET", "/apis").get("groups", [])
        ]
        for group_version in versions:
            base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
            group = group_version.rpartition("/")[0]
            for r in self._checked("GET", base).get("resources", []):
                if "/" in r["name"]:
                    continue  # a subresource
                resource = Resource(group_version, r["name"], r["kind"], bool(r["namespaced"]))
                names = [r["name"], r.get("singularName") or "", r["kind"], *r.get("shortNames", [])]
                if group:
                    version = group_version.rpartition("/")[2]
                    names += [f"{r['name']}.{group}", f"{r['name']}.{version}.{group}", f"{r['kind']}.{group}"]
                # The first group discovery names wins, as with kubectl (the core group's events).
                for alias in filter(None, names):
                    found.setdefault(alias.lower(), resource)
        return found

    # --- objects ---------------------------------------------------------------------------------

    def read(self, resource: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        """The object, or None when there is none of that name."""
        status, answer = self.request("GET", self.resource(resource).path(namespace, name))
        if status == 404:
            return None
        if status >= 400:
            raise ApiError(status, f"get {resource} {name}: {status} {answer.get('message') or answer}")
        found: dict[str, Any] = answer
        return found

    def list_objects(
        self,
        resource: str,
        namespace: str | None = None,
        *,
        field_selector: str = "",
        label_selector: str = "",
    ) -> list[dict[str, Any]]:
        """The objects in `namespace` (every namespace when None), each with its kind and apiVersion."""
        return self._list(self.resource(resource), namespace, field_selector, label_selector)[0]

    def _list(
        self, found: Resource, namespace: str | None, field_selector: str = "", label_selector: str = ""
    ) -> tuple[list[dict[str, Any]], str]:
        query = {k: v for k, v in (("fieldSelector", field_selector), ("labelSelector", label_selector)) if v}
        path = found.path(namespace) + (f"?{urllib.parse.urlencode(query)}" if query else "")
        answer = self._checked("GET", path)
        items: list[dict[str, Any]] = answer.get("items") or []
        for item in items:  # as kubectl shows them: a list's items carry no kind of their own
            item.setdefault("kind", found.kind)
            item.setdefault("apiVersion", found.group_version)
        return items, str(answer["metadata"].get("resourceVersion") or "")

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply, as `kubectl apply --server-side --force-conflicts` does it."""
        found = self._kind(obj)
        meta = obj["metadata"]
        namespace = meta.get("namespace") or ("default" if found.namespaced else None)
        query = urllib.parse.urlencode({"fieldManager": "kubectl", "force": "true"})
        path = f"{found.path(namespace, meta['name'])}?{query}"
        applied: dict[str, Any] = self._checked("PATCH", path, obj, "application/apply-patch+yaml")
        return applied

    def delete(self, resource: str, name: str, namespace: str = "default") -> bool:
        """Asks for the object's deletion, as `kubectl delete --wait=false`; False when there was none."""
        status, answer = self.request("DELETE", self.resource(resource).path(namespace, name))
        if status == 404:
            return False
        if status >= 400:
            raise ApiError(status, f"delete {resource} {name}: {status} {answer.get('message') or answer}")
        return True

    def _kind(self, obj: dict[str, Any]) -> Resource:
        group_version, kind = obj["apiVersion"], obj["kind"]
        group = group_version.rpartition("/")[0]
        found = self.resource(f"{kind}.{group}" if group else kind)
        if found.group_version != group_version:  # another version of the group than discovery prefers
            found = Resource(group_version, found.plural, found.kind, found.namespaced)
        return found

    # --- waiting ---------------------------------------------------------------------------------

    def wait(
        self,
        resource: str,
        name: str,
        test: Callable[[dict[str, Any] | None], object],
        timeout: float,
        namespace: str = "default",
    ) -> tuple[bool, dict[str, Any] | None]:
        """(True, the object) once `test(object)` holds, `None` standing for no object; (False, the last
        object seen) after `timeout` seconds.

        The object is watched: `test` is asked on every change as it happens, so it must depend on the
        object alone. An API server that is away meanwhile is asked again until the time is up.
        """
        found = self.resource(resource)
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while True:
            try:
                items, version = self._list(found, namespace, f"metadata.name={name}")
                last = items[0] if items else None
                if test(last):
                    return True, last
                for last in self._watch(found, namespace, name, version, deadline):
                    if test(last):
                        return True, last
            except TRANSIENT:
                time.sleep(RETRY_SECONDS)
            except ApiError as e:
                if e.status < 500 and e.status != 429:
                    raise
                time.sleep(RETRY_SECONDS)
            if time.monotonic() >= deadline:
                return False, last

    def _watch(
        self, found: Resource, namespace: str | None, name: str, version: str, deadline: float
    ) -> Iterator[dict[str, Any] | None]:
        """The object after each change from `version` on (None once deleted), until the deadline or the
        end of the stream."""
        left = deadline - time.monotonic()
        if left <= 0:
            return
        query = {
            "watch": "true",
            "fieldSelector": f"metadata.name={name}",
            "resourceVersion": version,
            "timeoutSeconds": str(max(1, math.ceil(left))),
        }
        conn = self._connection(left + 5)
        try:
            conn.request("GET", f"{found.path(namespace)}?{urllib.parse.urlencode(query)}")
            reply = conn.getresponse()
            if reply.status != 200:
                raise ApiError(reply.status, f"watch {found.plural} {name}: {reply.status} {reply.read()[:500]!r}")
            while line := reply.readline():
                event = json.loads(line)
                if event["type"] == "ERROR":
                    return  # the version is too old (410 Gone): listed and watched again
                if event["type"] == "BOOKMARK":
                    continue
                yield None if event["type"] == "DELETED" else event["object"]
        finally:
            conn.close()
