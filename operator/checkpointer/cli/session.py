"""The plugin's I/O: the cluster of the user's kubeconfig, with the user's own rights, and the bucket.

kubectl passes nothing to a plugin: the kubeconfig comes from --kubeconfig or KUBECONFIG, the
namespace from --namespace or the context's, as kubectl itself reads them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

import kubernetes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from kubernetes.client import ApiException

from checkpointer import GROUP, VERSION
from checkpointer.archive import signature
from checkpointer.cli.plan import PLURALS

if TYPE_CHECKING:
    from checkpointer.adapters.kube import Kube
    from checkpointer.archive.store import ArchiveStore
    from checkpointer.models import CheckpointStorage

T = TypeVar("T")


class CliError(Exception):
    """Something the user can act on; the plugin prints it and exits 1."""


def context_namespace(kubeconfig: str | None, context: str | None) -> str:
    """The namespace of `context` (the current one when None) in the kubeconfig, as kubectl picks it."""
    try:
        contexts, current = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    except (kubernetes.config.ConfigException, OSError) as e:
        raise CliError(f"cannot read the kubeconfig: {e}") from None
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else current
    if chosen is None:
        raise CliError(f"context {context!r} is not in the kubeconfig")
    return str((chosen.get("context") or {}).get("namespace") or "default")


class Session:
    def __init__(self, kubeconfig: str | None, context: str | None) -> None:
        try:
            kubernetes.config.load_kube_config(config_file=kubeconfig, context=context)  # type: ignore[no-untyped-call]
        except (kubernetes.config.ConfigException, OSError) as e:
            raise CliError(f"cannot load the kubeconfig: {e}") from None
        # Objects go through the client alone: the operator's adapters (boto3, kopf) cost a second
        # to import, which only `archives` and `inspect` pay.
        self.custom = kubernetes.client.CustomObjectsApi()
        self._kube: Kube | None = None

    @property
    def kube(self) -> Kube:
        if self._kube is None:
            from checkpointer.adapters.kube import Kube

            self._kube = Kube(connections=2)
        return self._kube

    # --- objects ----------------------------------------------------------------------------------

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        plural = PLURALS[obj["kind"]]

        def create() -> dict[str, Any]:
            # The client declares the answer an object; it is the JSON dict of the custom object.
            made = self.custom.create_namespaced_custom_object(GROUP, VERSION, meta["namespace"], plural, obj)
            return cast(dict[str, Any], made)

        return _call(create, f"create {obj['kind']} {meta['namespace']}/{meta['name']}")

    def find(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        def read() -> dict[str, Any] | None:
            try:
                found = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name)
            except ApiException as e:
                if e.status == 404:
                    return None
                raise
            return cast(dict[str, Any], found)

        return _call(read, f"read {kind} {namespace}/{name}")

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        found = self.find(kind, namespace, name)
        if found is None:
            raise CliError(f"{kind} {namespace}/{name} not found")
        return found

    # --- storages and their bucket ------------------------------------------------------------------

    def storage(self, name: str | None) -> CheckpointStorage:
        """The named CheckpointStorage, or the default one."""
        if name:
            found = _call(lambda: self.kube.storage(name), f"read CheckpointStorage {name}")
            if found is None:
                raise CliError(f"CheckpointStorage {name} not found")
            return found
        defaults = [s for s in _call(self.kube.storages, "list CheckpointStorages") if s.spec.default]
        if len(defaults) != 1:
            raise CliError(f"{len(defaults)} CheckpointStorages are marked default: name one")
        return defaults[0]

    def store(self, storage: CheckpointStorage) -> ArchiveStore:
        """The bucket, with the storage's credentials read through the user's own rights."""
        from checkpointer.archive.store import RateLimiter, Stores, Transfer

        # Reading manifests moves a few KiB: one connection, no limits.
        unlimited = RateLimiter(0)
        transfer = Transfer(
            part_size=8 * 1024 * 1024, concurrency=1, upload_limiter=unlimited, download_limiter=unlimited
        )
        try:
            return Stores(self.kube, transfer).of(storage)
        except ApiException as e:
            ref = storage.spec.credentials_secret_ref
            where = f"{ref.namespace}/{ref.name}" if ref else "?"
            raise CliError(
                f"cannot read the credentials Secret {where} of CheckpointStorage {storage.metadata.name}: "
                f"{e.status} {e.reason}"
            ) from None
        except ValueError as e:
            raise CliError(str(e)) from None

    def manifests(self, store: ArchiveStore, under: str) -> list[dict[str, Any]]:
        """Every manifest below `under`; one that is not JSON, or gone since the listing, is skipped."""
        with _bucket(store):
            found = []
            for directory in store.manifest_directories(under):
                with contextlib.suppress(CliError):
                    found.append(self._manifest(store, directory))
            return found

    def manifest(self, store: ArchiveStore, directory: str) -> dict[str, Any]:
        with _bucket(store):
            return self._manifest(store, directory)

    def has_manifest(self, store: ArchiveStore, directory: str) -> bool:
        from checkpointer import layout

        with _bucket(store):
            return store.exists(f"{directory}/{layout.MANIFEST}")

    def _manifest(self, store: ArchiveStore, directory: str) -> dict[str, Any]:
        from checkpointer import layout

        where = f"{store.uri(directory)}/{layout.MANIFEST}"
        body = store.manifest_bytes(directory)
        if body is None:
            raise CliError(f"no {where}")
        try:
            manifest = json.loads(body)
        except ValueError:
            raise CliError(f"{where} is not JSON") from None
        if not isinstance(manifest, dict):
            raise CliError(f"{where} is not a manifest")
        return manifest

    def signing_keys(self, namespace: str, config_map: str) -> tuple[dict[str, Ed25519PublicKey] | None, str]:
        """The controller's published public keys by keyID; (None, why) when they cannot be read."""
        try:
            published = self.kube.config_map_data(namespace, config_map)
        except ApiException as e:
            return None, f"ConfigMap {namespace}/{config_map} cannot be read ({e.status} {e.reason})"
        if published is None:
            return None, f"no ConfigMap {namespace}/{config_map} (set --operator-namespace)"
        return signature.public_keys(published), ""


@contextlib.contextmanager
def _bucket(store: ArchiveStore) -> Iterator[None]:
    """The bucket's errors as one line that names it."""
    from checkpointer.archive.store import CorruptArchive, StorageError

    try:
        yield
    except (*StorageError, CorruptArchive) as e:
        raise CliError(f"the bucket {store.uri('')} did not answer as expected: {e}") from None


def _call(fn: Callable[[], T], what: str) -> T:
    try:
        return fn()
    except ApiException as e:
        detail = e.reason
        with contextlib.suppress(ValueError):
            detail = json.loads(e.body or "{}").get("message") or detail
        raise CliError(f"cannot {what}: {detail}") from None
