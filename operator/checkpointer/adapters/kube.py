"""The Kubernetes API: objects the services read, status patches, Leases and Secrets."""

from __future__ import annotations

import base64
import datetime
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import kubernetes
from kubernetes.client import ApiException

from checkpointer import GROUP, VERSION
from checkpointer.adapters.storage import Credentials
from checkpointer.models import CheckpointStorage, Metadata, ObjectStatus

log = logging.getLogger(__name__)
T = TypeVar("T")

CHECKPOINTS = "containercheckpoints"
RESTORES = "containerrestores"
STORAGES = "checkpointstorages"
SCHEDULES = "checkpointschedules"
MIGRATIONS = "containermigrations"
# An Event the API server has not taken by then is given up: the next one must not wait behind it.
EVENT_TIMEOUT_SECONDS = 10


@dataclass(frozen=True)
class NodeState:
    """What choosing a migration's target needs of a Node."""

    name: str
    ready: bool
    unschedulable: bool


def load_config() -> None:
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]


class Kube:
    def __init__(self, connections: int) -> None:
        config = kubernetes.client.Configuration.get_default_copy()
        # One connection per thread that may call at once: beyond the pool's size, urllib3 opens
        # a connection (a TLS handshake) for the request and discards it after.
        config.connection_pool_maxsize = connections
        api = kubernetes.client.ApiClient(config)
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.core = kubernetes.client.CoreV1Api(api)
        self.coordination = kubernetes.client.CoordinationV1Api(api)

    # --- custom objects -------------------------------------------------------------------------

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object; no namespace: a cluster-scoped one (a CheckpointStorage)."""

        def read() -> object:
            if not namespace:
                return self.custom.get_cluster_custom_object(GROUP, VERSION, plural, name)
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)

        # The client declares the answer an object; it is the JSON dict of the custom object.
        return cast(dict[str, Any] | None, _found(read))

    def phases(self, plural: str, label_selector: str) -> dict[str, str]:
        """The phase of each object of `plural` that matches `label_selector`, in every namespace, by uid."""
        found: dict[str, Any] = self.custom.list_cluster_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, plural, label_selector=label_selector
        )
        return {str(o["metadata"]["uid"]): ObjectStatus.of(o).phase or "" for o in found["items"]}

    def list_all(self, plural: str, label_selector: str = "") -> list[dict[str, Any]]:
        """Every object of `plural` in every namespace that matches `label_selector`."""
        found: dict[str, Any] = self.custom.list_cluster_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, plural, label_selector=label_selector
        )
        return list(found["items"])

    def patch_status(
        self, plural: str, namespace: str, name: str, status: dict[str, Any], resource_version: str = ""
    ) -> dict[str, Any]:
        """Merge `status` in; with `resource_version`, only if the object is still at that version (else 409).
        No namespace: a cluster-scoped object (a CheckpointStorage).

        A resourceVersion is one object's revision of the one counter etcd keeps for all: an object made
        anew under the name never has it, so the same 409 refuses that one too. (A uid in the patch
        would not: the status subresource keeps the stored metadata and ignores the patch's.)
        """
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        if not namespace:  # a cluster-scoped object
            patched = self.custom.patch_cluster_custom_object_status(GROUP, VERSION, plural, name, body)
        else:
            patched = self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, plural, name, body)
        return cast(dict[str, Any], patched)

    def label(self, plural: str, namespace: str, name: str, resource_version: str, labels: dict[str, str]) -> bool:
        """Set `labels` if the object is still at `resource_version` (so still the same object); False when
        it is gone or changed meanwhile."""
        body = {"metadata": {"resourceVersion": resource_version, "labels": labels}}
        try:
            self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, plural, name, body)
        except ApiException as e:
            if e.status in (404, 409):
                return False
            raise
        return True

    def delete(self, plural: str, namespace: str, name: str, uid: str) -> bool:
        """Delete the object if it is still the one with `uid`; False when it is gone or another one."""
        body = kubernetes.client.V1DeleteOptions(preconditions=kubernetes.client.V1Preconditions(uid=uid))
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name, body=body)
        except ApiException as e:
            if e.status in (404, 409):
                return False
            raise
        return True

    def create(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create the object; None when one of that name exists already."""
        try:
            obj: dict[str, Any] = self.custom.create_namespaced_custom_object(  # type: ignore[assignment]
                GROUP, VERSION, namespace, plural, body
            )
        except ApiException as e:
            if e.status == 409:
                return None
            raise
        return obj

    def labelled(self, plural: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """The objects of `plural` in `namespace` that match `label_selector`."""
        found: dict[str, Any] = self.custom.list_namespaced_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, namespace, plural, label_selector=label_selector
        )
        items: list[dict[str, Any]] = found["items"]
        return items

    def create_event(self, kind: str, meta: Metadata, namespace: str, type_: str, reason: str, message: str) -> None:
        """An Event about the object `meta` names, in `namespace` (its own, when it has one)."""
        now = datetime.datetime.now(datetime.UTC)
        event = kubernetes.client.CoreV1Event(
            metadata=kubernetes.client.V1ObjectMeta(generate_name=f"{meta.name}.", namespace=namespace),
            involved_object=kubernetes.client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind=kind,
                name=meta.name,
                namespace=meta.namespace or None,
                uid=meta.uid,
            ),
            reason=reason,
            message=message[:1024],
            type=type_,
            source=kubernetes.client.V1EventSource(component="checkpointer"),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        self.core.create_namespaced_event(namespace, event, _request_timeout=EVENT_TIMEOUT_SECONDS)

    def storage(self, name: str) -> CheckpointStorage | None:
        obj = _found(lambda: self.custom.get_cluster_custom_object(GROUP, VERSION, STORAGES, name))
        return None if obj is None else CheckpointStorage.model_validate(obj)

    def storages(self) -> list[CheckpointStorage]:
        found: dict[str, Any] = self.custom.list_cluster_custom_object(GROUP, VERSION, STORAGES)  # type: ignore[assignment]
        items = found["items"]
        return [CheckpointStorage.model_validate(o) for o in items]

    def credentials(self, storage: CheckpointStorage) -> Credentials | None:
        ref = storage.spec.credentials_secret_ref
        if ref is None:
            return None
        secret = self.core.read_namespaced_secret(ref.name, ref.namespace)
        data = secret.data or {}
        try:
            return Credentials(
                base64.b64decode(data["accessKeyID"]).decode(),
                base64.b64decode(data["secretAccessKey"]).decode(),
            )
        except KeyError as e:
            raise ValueError(f"Secret {ref.namespace}/{ref.name} has no key {e}") from None

    def encryption_secret(self, storage: CheckpointStorage) -> tuple[dict[str, bytes], str] | None:
        """The data of the storage's encryption Secret, decoded, and words naming it for messages;
        None when the storage does not encrypt. Raises ValueError when the Secret cannot be read."""
        if storage.spec.encryption is None:
            return None
        ref = storage.spec.encryption.secret_ref
        where = f"encryption Secret {ref.namespace}/{ref.name} of CheckpointStorage {storage.metadata.name}"
        try:
            secret = self.core.read_namespaced_secret(ref.name, ref.namespace)
        except ApiException as e:
            # Forbidden: the Secret is missing from the chart's rbac.storageSecrets.
            raise ValueError(f"the {where} cannot be read: {e.status} {e.reason}") from None
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}, where

    # --- the signing key ------------------------------------------------------------------------

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """A Secret's data, decoded; None when it does not exist."""
        secret = _found(lambda: self.core.read_namespaced_secret(name, namespace))
        if secret is None:
            return None
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    def create_secret(self, namespace: str, name: str, data: dict[str, bytes], labels: dict[str, str]) -> bool:
        """Create an immutable Secret; False when one of that name exists (someone else created it first)."""
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "type": "Opaque",
            "immutable": True,
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
        }
        try:
            self.core.create_namespaced_secret(namespace, body)  # type: ignore[arg-type]
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True

    def config_map_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A ConfigMap's data; None when it does not exist."""
        config_map = _found(lambda: self.core.read_namespaced_config_map(name, namespace))
        return None if config_map is None else dict(config_map.data or {})

    def put_config_map(self, namespace: str, name: str, data: dict[str, str], labels: dict[str, str]) -> None:
        """Create the ConfigMap with `data`, or replace the data of the one there."""
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "data": data,
        }
        try:
            self.core.create_namespaced_config_map(namespace, body)  # type: ignore[arg-type]
            return
        except ApiException as e:
            if e.status != 409:
                raise
        # A JSON merge patch cannot drop keys that `data` no longer has: replace the whole map.
        patch = [{"op": "add", "path": "/data", "value": data}]  # add replaces a member that exists
        self.core.patch_namespaced_config_map(name, namespace, patch)

    # --- Pods ---------------------------------------------------------------------------------

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Pod as the API server sends it, in its JSON form (camelCase keys); None when there is none."""

        def read() -> object:
            return self.core.read_namespaced_pod(name, namespace, _preload_content=False)

        response = _found(read)
        if response is None:
            return None
        return cast(dict[str, Any], json.loads(response.data))  # type: ignore[attr-defined]

    # --- nodes and agent leases -----------------------------------------------------------------

    def node_exists(self, name: str) -> bool:
        return _found(lambda: self.core.read_node(name)) is not None

    def node_states(self) -> list[NodeState]:
        """Every Node: its name, whether its Ready condition is True, and whether it is cordoned."""
        found = []
        for item in self.core.list_node().items:
            if not item.metadata:
                continue
            conditions = (item.status.conditions if item.status else None) or []
            ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
            found.append(NodeState(str(item.metadata.name), ready, bool(item.spec and item.spec.unschedulable)))
        return found

    def node_names(self) -> list[str]:
        return [str(n.metadata.name) for n in self.core.list_node().items if n.metadata]

    def namespace_names(self) -> list[str] | None:
        """Every namespace's name; None where this identity may not list them."""
        try:
            return [str(n.metadata.name) for n in self.core.list_namespace().items if n.metadata]
        except ApiException as e:
            if e.status == 403:
                return None
            raise

    def lease_ages(self, namespace: str) -> dict[str, tuple[float, int]]:
        """Seconds since each Lease of `namespace` was last renewed and its duration, by name; one request."""
        ages = {}
        now = datetime.datetime.now(datetime.UTC)
        for lease in self.coordination.list_namespaced_lease(namespace).items:
            spec = lease.spec
            renewed = (spec.renew_time or spec.acquire_time) if spec else None
            if spec and lease.metadata and renewed is not None:
                age = (now - renewed).total_seconds()
                ages[str(lease.metadata.name)] = (age, int(spec.lease_duration_seconds or 0))
        return ages

    def lease_age(self, namespace: str, name: str) -> tuple[float, int] | None:
        """Seconds since the Lease was last renewed and its duration; None when it does not exist."""
        lease = self.read_lease(namespace, name)
        if lease is None or lease.spec is None:
            return None
        renewed = lease.spec.renew_time or lease.spec.acquire_time
        if renewed is None:
            return None
        age = (datetime.datetime.now(datetime.UTC) - renewed).total_seconds()
        return age, int(lease.spec.lease_duration_seconds or 0)

    def renew_lease(
        self, namespace: str, name: str, holder: str, duration: int, annotations: dict[str, str] | None = None
    ) -> bool:
        """Renew the Lease, or create it (True); `annotations` are set too, the others it carries stay."""
        now = datetime.datetime.now(datetime.UTC)
        body: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/name": "checkpointer"},
            },
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": duration,
                "renewTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            },
        }
        if annotations:
            body["metadata"]["annotations"] = annotations
        try:
            self.coordination.patch_namespaced_lease(name, namespace, body)
        except ApiException as e:
            if e.status != 404:
                raise
            body["spec"]["acquireTime"] = body["spec"]["renewTime"]
            self.coordination.create_namespaced_lease(namespace, body)  # type: ignore[arg-type]
            return True
        return False

    def lease_annotations(self, namespace: str, name: str) -> dict[str, str] | None:
        """The Lease's annotations; None when it does not exist."""
        lease = self.read_lease(namespace, name)
        if lease is None:
            return None
        return dict((lease.metadata.annotations if lease.metadata else None) or {})

    def read_lease(self, namespace: str, name: str) -> kubernetes.client.V1Lease | None:
        return _found(lambda: self.coordination.read_namespaced_lease(name, namespace))

    def create_lease(
        self, namespace: str, body: dict[str, Any], timeout: float | None = None
    ) -> kubernetes.client.V1Lease:
        """Raises ApiException 409 when the Lease exists: someone else created it first."""
        return self.coordination.create_namespaced_lease(namespace, body, _request_timeout=timeout)  # type: ignore[arg-type]

    def replace_lease(
        self, namespace: str, name: str, body: dict[str, Any], timeout: float | None = None
    ) -> kubernetes.client.V1Lease:
        """Raises ApiException 409 when body's metadata.resourceVersion is no longer the Lease's."""
        return self.coordination.replace_namespaced_lease(name, namespace, body, _request_timeout=timeout)  # type: ignore[arg-type]


def _found(read: Callable[[], T]) -> T | None:
    """What `read()` returns; None when the API server answers that the object does not exist."""
    try:
        return read()
    except ApiException as e:
        if e.status == 404:
            return None
        raise
