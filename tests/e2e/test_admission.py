"""The CRDs' admission rules, checked against a real kube-apiserver.

Every bad object of docs/api.md ("Rejected at admission") that can be judged from the object alone
is rejected at admission with the human message pinned here (a changed message is a changed
contract); good objects are accepted; specs are immutable; undeclared status fields are pruned
while podman's stats survive.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from helpers import unique, until
from localenv.controlplane import ControlPlane

pytestmark = pytest.mark.e2e

CRDS = Path(__file__).resolve().parents[2] / "crds"
GROUP, VERSION = "checkpointer.dev", "v1alpha1"
PLURALS = {
    "ContainerCheckpoint": "containercheckpoints",
    "ContainerRestore": "containerrestores",
    "CheckpointStorage": "checkpointstorages",
    "CheckpointSchedule": "checkpointschedules",
}
RUN = unique("admission")
SUITE_LABEL = "test.checkpointer.dev/suite"
SHA = "0123456789abcdef" * 4

# The messages people read. Keep in sync with crds/*.yaml: that is the point of pinning them.
M_NODE_OR_POD = (
    "nodeName is required: name the node whose podman holds the containers, or set podRef to checkpoint a "
    "Pod's containers on the Pod's own node"
)
M_POD_EXPORTED = (
    "a Pod's checkpoint is always exported: set export (export: {} for the default CheckpointStorage); the "
    "node keeps no checkpoint of a Pod"
)
M_POD_RUNS = (
    "a Pod's container always keeps running while it is checkpointed (the kubelet's runtime checkpoints it "
    "and leaves it running): remove leaveRunning: false"
)
M_POD_NO_PRE_DUMPS = (
    "preCheckpoint, withPrevious and previousCheckpointRef are podman's and cannot be used with podRef: the "
    "Pod's runtime takes whole checkpoints only; remove them"
)
M_POD_NO_TCP_KEEP = (
    "tcpEstablished and keep are podman's and cannot be used with podRef: the Pod's runtime checkpoints a "
    "container with its own settings and keeps no CRIU files; remove them"
)
M_POD_CONTAINER = (
    "each entry of podRef.containers must be a container name of the Pod: lowercase letters, digits and '-' "
    "(a DNS-1123 label)"
)
M_EXACTLY_ONE_TARGET = "set exactly one of containers, all: true, latest: true or podRef to choose what to checkpoint"
M_PRE_WITH_PREVIOUS = (
    "preCheckpoint and withPrevious cannot be combined (podman's --pre-checkpoint is not available "
    "with --with-previous): make the pre-checkpoint first, then a second ContainerCheckpoint with "
    "withPrevious"
)
M_REF_NEEDS_WITH_PREVIOUS = (
    "previousCheckpointRef is only allowed with withPrevious: true; set withPrevious or remove previousCheckpointRef"
)
M_WITH_PREVIOUS_NEEDS_REF = (
    "withPrevious: true needs previousCheckpointRef naming the pre-checkpoint ContainerCheckpoint it builds on"
)
M_COMPRESS_NEEDS_EXPORT = (
    "compress applies only to an exported checkpoint (podman's --compress needs --export); set "
    "export or remove compress"
)
M_IGNORE_ROOTFS_NEEDS_EXPORT = (
    "ignoreRootfs applies only to an exported checkpoint (podman's --ignore-rootfs needs --export); "
    "set export or remove ignoreRootfs"
)
M_IGNORE_VOLUMES_NEEDS_EXPORT = (
    "ignoreVolumes applies only to an exported checkpoint (podman's --ignore-volumes needs "
    "--export); set export or remove ignoreVolumes"
)
M_CCP_IMMUTABLE = "spec is immutable; delete and recreate the ContainerCheckpoint"
M_CRST_IMMUTABLE = "spec is immutable; delete and recreate the ContainerRestore"
M_NODE_NAME = (
    "nodeName must be the name of a Node: lowercase letters, digits, '-' and '.', starting and "
    "ending with a letter or digit (a DNS-1123 subdomain)"
)
M_CONTAINER = (
    "each entry of containers must be a podman container name or ID: letters, digits, '_', '.' "
    "and '-', starting with a letter or digit"
)
M_PREVIOUS_REF_NAME = (
    "previousCheckpointRef.name must be the name of a ContainerCheckpoint: lowercase letters, "
    "digits, '-' and '.' (a DNS-1123 subdomain)"
)
M_STORAGE_REF_NAME = (
    "storageRef.name must be the name of a CheckpointStorage: lowercase letters, digits, '-' and "
    "'.' (a DNS-1123 subdomain)"
)
M_SOURCE = (
    "source must set exactly one of checkpointRef (a ContainerCheckpoint in this namespace) and "
    "archive (an archive in a CheckpointStorage)"
)
M_NAME_WITH_TCP = (
    "name cannot be combined with tcpEstablished (podman refuses --name with --tcp-established): "
    "remove name to keep the original container name, or remove tcpEstablished"
)
M_TCP_ESTABLISHED_WITH_CLOSE = (
    "tcpEstablished and tcpClose cannot be combined: tcpEstablished restores the established TCP "
    "connections, tcpClose drops them; choose one"
)
M_PUBLISH = (
    "each entry of publish must look like [[ip:][hostPort]:]containerPort[/protocol], for example "
    "8080:80, 127.0.0.1:8080:80/tcp, 127.0.0.1::80 or 8000-8009:9000-9009/udp, with protocol tcp, "
    "udp or sctp"
)
M_PUBLISH_RANGE = "ports in publish must be between 1 and 65535"
M_CHECKPOINT_REF_NAME = (
    "checkpointRef.name must be the name of a ContainerCheckpoint: lowercase letters, digits, '-' "
    "and '.' (a DNS-1123 subdomain)"
)
M_CHECKPOINT_REF_CONTAINER = (
    "checkpointRef.container must be a podman container name or ID: letters, digits, '_', '.' and "
    "'-', starting with a letter or digit"
)
M_RESTORE_NAME = (
    "name must be a podman container name: letters, digits, '_', '.' and '-', starting with a letter or digit"
)
M_POD = "pod must be a podman pod name or ID: letters, digits, '_', '.' and '-', starting with a letter or digit"
M_BUCKET = (
    "bucket must be an S3 bucket name: 3 to 63 lowercase letters, digits, '.' and '-', starting and "
    "ending with a letter or digit, without '..'"
)
M_ENDPOINT = (
    "endpoint must be an http:// or https:// URL of the S3 API, such as https://s3.example.com or http://127.0.0.1:8333"
)
M_CA_BUNDLE = "caBundle must be PEM text holding one or more '-----BEGIN CERTIFICATE-----' blocks"
M_SECRET_NAMESPACE = (
    "credentialsSecretRef.namespace must be a namespace name: lowercase letters, digits and '-' (a DNS-1123 label)"
)
M_SECRET_NAME = (
    "credentialsSecretRef.name must be a Secret name: lowercase letters, digits, '-' and '.' (a DNS-1123 subdomain)"
)


def m_control(field: str) -> str:
    """The message of a free string a tenant wrote with a control character in it (docs/security.md)."""
    return f"{field} must not contain control characters (newline, tab, escape, …) or line separators"


M_CONTROL_PEM = "caBundle must not contain control characters other than line breaks and tabs (escape, NUL, …)"
PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUP\n-----END CERTIFICATE-----\n"


def key_messages(name: str, leading_slash: str, empty_hint: str = "") -> dict[str, str]:
    """Bad key -> message, for the key rules shared by export.key, archive.key and previous.key."""
    empty = f"{name} must not be empty nor have empty segments ('//' or a trailing '/'){empty_hint}"
    return {
        "/checkpoints/web.tar.zst": f"{name} {leading_slash}: remove the leading '/'",
        "team/../other/web.tar.zst": f"{name} must not contain '..'",
        "team//web.tar.zst": empty,
        "team/web/": empty,
        "": empty,
    }


@dataclass(frozen=True)
class Rejected:
    id: str
    kind: str
    spec: dict[str, Any]
    field: str
    message: str


CCP: dict[str, Any] = {"nodeName": "node-a", "containers": ["web"]}
CRST: dict[str, Any] = {"nodeName": "node-a", "source": {"checkpointRef": {"name": "web-1"}}}
CKS: dict[str, Any] = {"bucket": "checkpoints"}
CS: dict[str, Any] = {"schedule": "*/5 * * * *", "template": CCP}
BASE: dict[str, dict[str, Any]] = {"ContainerCheckpoint": CCP, "ContainerRestore": CRST, "CheckpointStorage": CKS}


def ccp(id: str, field: str, message: str, drop: tuple[str, ...] = (), **spec: Any) -> Rejected:
    return Rejected(id, "ContainerCheckpoint", with_spec(CCP, drop, spec), field, message)


def crst(id: str, field: str, message: str, drop: tuple[str, ...] = (), **spec: Any) -> Rejected:
    return Rejected(id, "ContainerRestore", with_spec(CRST, drop, spec), field, message)


def cks(id: str, field: str, message: str, drop: tuple[str, ...] = (), **spec: Any) -> Rejected:
    return Rejected(id, "CheckpointStorage", with_spec(CKS, drop, spec), field, message)


def cs(id: str, field: str, message: str, **spec: Any) -> Rejected:
    return Rejected(id, "CheckpointSchedule", with_spec(CS, (), spec), field, message)


def with_spec(base: dict[str, Any], drop: tuple[str, ...], changes: dict[str, Any]) -> dict[str, Any]:
    spec = {k: v for k, v in base.items() if k not in drop}
    spec.update(changes)
    return spec


PREVIOUS_REF = {"name": "pre-1"}
ARCHIVE = {"storageRef": {"name": "s3"}, "key": "default/web-1-0a1b2c3d/web.tar.zst", "sha256": SHA}

REJECTED = [
    # ContainerCheckpoint: what to checkpoint
    ccp("ccp-no-target", "spec", M_EXACTLY_ONE_TARGET, drop=("containers",)),
    ccp("ccp-all-and-latest-false", "spec", M_EXACTLY_ONE_TARGET, ("containers",), all=False, latest=False),
    ccp("ccp-containers-and-all", "spec", M_EXACTLY_ONE_TARGET, all=True),
    ccp("ccp-containers-and-latest", "spec", M_EXACTLY_ONE_TARGET, latest=True),
    ccp("ccp-all-and-latest", "spec", M_EXACTLY_ONE_TARGET, ("containers",), all=True, latest=True),
    ccp("ccp-empty-containers", "spec.containers", "should have at least 1 items", containers=[]),
    ccp("ccp-duplicate-container", "spec.containers[1]", 'Duplicate value: "web"', containers=["web", "web"]),
    ccp("ccp-bad-container-name", "spec.containers[1]", M_CONTAINER, containers=["web", "-web"]),
    ccp("ccp-container-with-slash", "spec.containers[0]", M_CONTAINER, containers=["pod/web"]),
    # pre-checkpoints
    ccp(
        "ccp-pre-and-with-previous",
        "spec",
        M_PRE_WITH_PREVIOUS,
        preCheckpoint=True,
        withPrevious=True,
        previousCheckpointRef=PREVIOUS_REF,
    ),
    ccp(
        "ccp-ref-without-with-previous",
        "spec.previousCheckpointRef",
        M_REF_NEEDS_WITH_PREVIOUS,
        previousCheckpointRef=PREVIOUS_REF,
    ),
    ccp(
        "ccp-ref-with-previous-false",
        "spec.previousCheckpointRef",
        M_REF_NEEDS_WITH_PREVIOUS,
        withPrevious=False,
        previousCheckpointRef=PREVIOUS_REF,
    ),
    ccp("ccp-with-previous-without-ref", "spec.withPrevious", M_WITH_PREVIOUS_NEEDS_REF, withPrevious=True),
    ccp(
        "ccp-bad-previous-ref-name",
        "spec.previousCheckpointRef.name",
        M_PREVIOUS_REF_NAME,
        withPrevious=True,
        previousCheckpointRef={"name": "Pre_1"},
    ),
    ccp(
        "ccp-previous-ref-without-name",
        "spec.previousCheckpointRef.name",
        "Required value",
        withPrevious=True,
        previousCheckpointRef={},
    ),
    # export-only flags
    ccp("ccp-compress-without-export", "spec.compress", M_COMPRESS_NEEDS_EXPORT, compress="zstd"),
    ccp("ccp-compress-none-without-export", "spec.compress", M_COMPRESS_NEEDS_EXPORT, compress="none"),
    ccp(
        "ccp-ignore-rootfs-without-export",
        "spec.ignoreRootfs",
        M_IGNORE_ROOTFS_NEEDS_EXPORT,
        ignoreRootfs=True,
    ),
    ccp(
        "ccp-ignore-volumes-without-export",
        "spec.ignoreVolumes",
        M_IGNORE_VOLUMES_NEEDS_EXPORT,
        ignoreVolumes=True,
    ),
    ccp(
        "ccp-unknown-compression",
        "spec.compress",
        'Unsupported value: "xz": supported values: "zstd", "none", "gzip"',
        export={},
        compress="xz",
    ),
    ccp(
        "ccp-bad-storage-name",
        "spec.export.storageRef.name",
        M_STORAGE_REF_NAME,
        export={"storageRef": {"name": "S3"}},
    ),
    *(
        ccp(f"ccp-export-key-{i}", "spec.export.key", message, export={"key": key})
        for i, (key, message) in enumerate(
            key_messages(
                "export.key", "is relative to the storage's prefix", "; omit it to use the default folder"
            ).items()
        )
    ),
    # names
    ccp("ccp-bad-node-name", "spec.nodeName", M_NODE_NAME, nodeName="Node_A"),
    ccp("ccp-node-name-ends-with-dash", "spec.nodeName", M_NODE_NAME, nodeName="node-"),
    ccp("ccp-no-node-name", "spec.nodeName", M_NODE_OR_POD, drop=("nodeName",)),
    ccp("ccp-pod-and-containers", "spec", M_EXACTLY_ONE_TARGET, podRef={"name": "web"}, export={}),
    ccp(
        "ccp-pod-without-export",
        "spec.podRef",
        M_POD_EXPORTED,
        ("containers", "nodeName"),
        podRef={"name": "web"},
    ),
    ccp(
        "ccp-pod-pre-checkpoint",
        "spec.podRef",
        M_POD_NO_PRE_DUMPS,
        ("containers",),
        podRef={"name": "web"},
        export={},
        preCheckpoint=True,
    ),
    ccp(
        "ccp-pod-keep",
        "spec.podRef",
        M_POD_NO_TCP_KEEP,
        ("containers",),
        podRef={"name": "web"},
        export={},
        keep=True,
    ),
    ccp(
        "ccp-pod-stopped",
        "spec.leaveRunning",
        M_POD_RUNS,
        ("containers",),
        podRef={"name": "web"},
        export={},
        leaveRunning=False,
    ),
    ccp(
        "ccp-pod-bad-container",
        "spec.podRef.containers[0]",
        M_POD_CONTAINER,
        ("containers",),
        podRef={"name": "web", "containers": ["Web_1"]},
        export={},
    ),
    # ContainerRestore: source
    crst("crst-no-source", "spec.source", M_SOURCE, drop=("source",)),
    crst("crst-empty-source", "spec.source", M_SOURCE, source={}),
    crst(
        "crst-two-sources",
        "spec.source",
        M_SOURCE,
        source={"checkpointRef": {"name": "web-1"}, "archive": ARCHIVE},
    ),
    crst(
        "crst-checkpoint-ref-without-name",
        "spec.source.checkpointRef.name",
        "Required value",
        source={"checkpointRef": {"container": "web"}},
    ),
    crst(
        "crst-bad-checkpoint-ref-name",
        "spec.source.checkpointRef.name",
        M_CHECKPOINT_REF_NAME,
        source={"checkpointRef": {"name": "web_1"}},
    ),
    crst(
        "crst-bad-checkpoint-ref-container",
        "spec.source.checkpointRef.container",
        M_CHECKPOINT_REF_CONTAINER,
        source={"checkpointRef": {"name": "web-1", "container": "_web"}},
    ),
    crst(
        "crst-archive-without-key",
        "spec.source.archive.key",
        "Required value",
        source={"archive": {"storageRef": {"name": "s3"}}},
    ),
    crst(
        "crst-archive-bad-storage-name",
        "spec.source.archive.storageRef.name",
        M_STORAGE_REF_NAME,
        source={"archive": {**ARCHIVE, "storageRef": {"name": "s3_store"}}},
    ),
    crst(
        "crst-archive-sha256-upper-case",
        "spec.source.archive.sha256",
        "archive.sha256 must be 64 lowercase hexadecimal digits",
        source={"archive": {**ARCHIVE, "sha256": SHA.upper()}},
    ),
    crst(
        "crst-archive-sha256-short",
        "spec.source.archive.sha256",
        "archive.sha256 must be 64 lowercase hexadecimal digits",
        source={"archive": {**ARCHIVE, "sha256": SHA[:-1]}},
    ),
    *(
        crst(
            f"crst-archive-key-{i}",
            "spec.source.archive.key",
            message,
            source={"archive": {**ARCHIVE, "key": key}},
        )
        for i, (key, message) in enumerate(key_messages("archive.key", "is an object key in the bucket").items())
    ),
    *(
        crst(f"crst-previous-key-{i}", "spec.previous.key", message, previous={"key": key})
        for i, (key, message) in enumerate(key_messages("previous.key", "is an object key in the bucket").items())
    ),
    crst(
        "crst-previous-sha256",
        "spec.previous.sha256",
        "previous.sha256 must be 64 lowercase hexadecimal digits",
        previous={"key": "default/pre-1-0a1b2c3d/web.tar.zst", "sha256": "not-a-digest"},
    ),
    crst("crst-previous-without-key", "spec.previous.key", "Required value", previous={"sha256": SHA}),
    # restore flags
    crst("crst-name-with-tcp-established", "spec.name", M_NAME_WITH_TCP, name="web-2", tcpEstablished=True),
    crst(
        "crst-tcp-established-with-close",
        "spec.tcpClose",
        M_TCP_ESTABLISHED_WITH_CLOSE,
        tcpEstablished=True,
        tcpClose=True,
    ),
    crst("crst-bad-name", "spec.name", M_RESTORE_NAME, name="web 2"),
    crst("crst-bad-pod", "spec.pod", M_POD, pod="-pod"),
    crst("crst-bad-node-name", "spec.nodeName", M_NODE_NAME, nodeName="node.a."),
    crst("crst-no-node-name", "spec.nodeName", "Required value", drop=("nodeName",)),
    *(
        crst(f"crst-publish-{bad}", "spec.publish[1]", M_PUBLISH, publish=["8080:80", bad])
        for bad in [
            "web",
            "80/http",
            "80/TCP",
            ":80",
            "127.0.0.1:80",
            "8080:80:90",
            "0:80",
            "80-",
            "localhost:8080:80",
        ]
    ),
    *(
        crst(f"crst-publish-range-{bad}", "spec.publish[0]", M_PUBLISH_RANGE, publish=[bad])
        for bad in ["70000:80", "8080:65536/udp", "1-99999"]
    ),
    # CheckpointStorage
    cks("cks-no-bucket", "spec.bucket", "Required value", drop=("bucket",)),
    *(
        cks(f"cks-bucket-{bad}", "spec.bucket", M_BUCKET, bucket=bad)
        for bad in ["My_Bucket", "ab", "a..b", "-abc", "abc-"]
    ),
    cks(
        "cks-prefix-leading-slash",
        "spec.prefix",
        "prefix is a folder inside the bucket: remove the leading '/'",
        prefix="/checkpoints",
    ),
    cks("cks-prefix-dot-dot", "spec.prefix", "prefix must not contain '..'", prefix="team/../checkpoints"),
    *(
        cks(
            f"cks-prefix-empty-segment-{i}",
            "spec.prefix",
            "prefix must not have empty segments: remove the trailing '/' and any '//'",
            prefix=bad,
        )
        for i, bad in enumerate(["team//checkpoints", "checkpoints/"])
    ),
    *(
        cks(f"cks-endpoint-{i}", "spec.endpoint", M_ENDPOINT, endpoint=bad)
        for i, bad in enumerate(["s3.example.com", "ftp://s3.example.com", "http://", "https:///bucket", "/s3"])
    ),
    cks("cks-ca-bundle-not-pem", "spec.caBundle", M_CA_BUNDLE, caBundle="MIIBszCCAVmgAwIBAgIUP"),
    cks(
        "cks-secret-bad-namespace",
        "spec.credentialsSecretRef.namespace",
        M_SECRET_NAMESPACE,
        credentialsSecretRef={"namespace": "Kube_System", "name": "s3-credentials"},
    ),
    cks(
        "cks-secret-bad-name",
        "spec.credentialsSecretRef.name",
        M_SECRET_NAME,
        credentialsSecretRef={"namespace": "checkpointer", "name": "S3"},
    ),
    cks(
        "cks-secret-without-namespace",
        "spec.credentialsSecretRef.namespace",
        "Required value",
        credentialsSecretRef={"name": "s3-credentials"},
    ),
    cks(
        "cks-unknown-deletion-policy",
        "spec.deletionPolicy",
        'Unsupported value: "Keep": supported values: "Delete", "Retain"',
        deletionPolicy="Keep",
    ),
    # A tenant's strings: no control characters, so none can forge a log line or reach a terminal.
    ccp("ccp-key-newline", "spec.export.key", m_control("export.key"), export={"key": "web\nINFO forged"}),
    ccp("ccp-key-tab", "spec.export.key", m_control("export.key"), export={"key": "web\tx"}),
    ccp("ccp-key-line-separator", "spec.export.key", m_control("export.key"), export={"key": "web\u2028x"}),
    ccp("ccp-container-escape", "spec.containers[0]", M_CONTAINER, containers=["web\x1b[31m"]),
    ccp("ccp-node-name-newline", "spec.nodeName", M_NODE_NAME, nodeName="node-a\n"),
    crst(
        "crst-archive-key-escape",
        "spec.source.archive.key",
        m_control("archive.key"),
        source={"archive": {**ARCHIVE, "key": "web\x1b]0;x\x07.tar"}},
    ),
    crst("crst-previous-key-newline", "spec.previous.key", m_control("previous.key"), previous={"key": "a\nb"}),
    crst(
        "crst-checkpoint-ref-container-newline",
        "spec.source.checkpointRef.container",
        M_CHECKPOINT_REF_CONTAINER,
        source={"checkpointRef": {"name": "web-1", "container": "web\n"}},
    ),
    crst("crst-name-escape", "spec.name", M_RESTORE_NAME, name="web\x1b"),
    cks("cks-prefix-newline", "spec.prefix", m_control("prefix"), prefix="team\nx"),
    cks("cks-region-escape", "spec.region", m_control("region"), region="eu\x1b[2J"),
    cks("cks-ca-bundle-escape", "spec.caBundle", M_CONTROL_PEM, caBundle=PEM + "\x1b[2J"),
    cs("cs-schedule-newline", "spec.schedule", m_control("schedule"), schedule="*/5 * * * *\n"),
    cs(
        "cs-template-key-newline",
        "spec.template.export.key",
        m_control("export.key"),
        template={**CCP, "export": {"key": "a\nb"}},
    ),
]

ACCEPTED = {
    "ContainerCheckpoint": [
        CCP,
        {"nodeName": "node-a", "containers": ["web", "db_1", "cache.v2", "3f2a9c" * 10 + "abcd"]},
        {"nodeName": "node-a.example.com", "all": True, "latest": False},
        {"nodeName": "node-a", "latest": True, "leaveRunning": True, "tcpEstablished": True, "keep": True},
        {"nodeName": "node-a", "containers": ["web"], "export": {}},
        {
            "nodeName": "node-a",
            "containers": ["web"],
            "export": {"storageRef": {"name": "s3"}, "key": "team-a/migrations/web-1"},
            "compress": "gzip",
            "ignoreRootfs": True,
            "ignoreVolumes": True,
        },
        {"nodeName": "node-a", "containers": ["web"], "export": {}, "compress": "none"},
        {"nodeName": "node-a", "containers": ["web"], "preCheckpoint": True, "withPrevious": False},
        {
            "nodeName": "node-a",
            "containers": ["web"],
            "withPrevious": True,
            "previousCheckpointRef": PREVIOUS_REF,
        },
        # false is the same as unset
        {"nodeName": "node-a", "containers": ["web"], "ignoreRootfs": False, "ignoreVolumes": False},
        # A Pod's: no node needed, the runtime's own settings
        {"podRef": {"name": "web"}, "export": {}},
        {"nodeName": "node-a", "podRef": {"name": "web", "containers": ["web", "sidecar"]}, "export": {}},
        {"podRef": {"name": "web"}, "export": {"storageRef": {"name": "s3"}}, "compress": "gzip", "leaveRunning": True},
    ],
    "ContainerRestore": [
        CRST,
        {
            "nodeName": "node-b",
            "source": {"checkpointRef": {"name": "web-1", "container": "web"}},
            "name": "web-2",
        },
        {
            "nodeName": "node-b",
            "source": {"archive": ARCHIVE},
            "previous": {
                "storageRef": {"name": "s3"},
                "key": "default/pre-1-0a1b2c3d/web.tar",
                "sha256": SHA,
            },
            "tcpClose": True,
            "ignoreRootfs": True,
            "ignoreVolumes": True,
            "ignoreStaticIP": True,
            "ignoreStaticMAC": True,
            "keep": True,
            "fileLocks": True,
            "pod": "pod-1",
            "publish": [
                "80",
                "53/udp",
                "8080:80",
                "127.0.0.1:8080:80/tcp",
                "127.0.0.1::80",
                "8000-8009:9000-9009/udp",
                "[::1]:8443:443",
                "65535:1/sctp",
            ],
        },
        {
            "nodeName": "node-b",
            "source": {"archive": {"key": "web.tar"}},
            "tcpEstablished": True,
            "tcpClose": False,
        },
    ],
    "CheckpointStorage": [
        CKS,
        {
            "bucket": "checkpoints.example-1",
            "prefix": "team-a/checkpoints",
            "endpoint": "http://127.0.0.1:8333",
            "region": "eu-west-1",
            "forcePathStyle": True,
            "caBundle": "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUP\n-----END CERTIFICATE-----\n",
            "credentialsSecretRef": {"namespace": "checkpointer", "name": "s3-credentials"},
            "default": True,
            "deletionPolicy": "Retain",
        },
        {"bucket": "abc", "endpoint": "https://s3.eu-west-1.amazonaws.com", "prefix": ""},
        {"bucket": "abc", "endpoint": "https://[::1]:9000/"},
    ],
}


class Api:
    """The custom objects of this suite, in one namespace made for it."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.objects = client.CustomObjectsApi(api_client)
        self.namespace = namespace

    def body(self, kind: str, spec: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        metadata: dict[str, Any] = {"labels": {SUITE_LABEL: RUN}}
        if name is None:
            metadata["generateName"] = f"{kind.lower()}-"
        else:
            metadata["name"] = name
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": metadata, "spec": spec}

    def create(self, kind: str, spec: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        body = self.body(kind, spec, name)
        if kind == "CheckpointStorage":
            obj = self.objects.create_cluster_custom_object(GROUP, VERSION, PLURALS[kind], body)
        else:
            obj = self.objects.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURALS[kind], body)
        return cast(dict[str, Any], obj)

    def get(self, kind: str, name: str) -> dict[str, Any]:
        obj = self.objects.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURALS[kind], name)
        return cast(dict[str, Any], obj)

    def replace_spec(self, kind: str, name: str, change: dict[str, Any]) -> dict[str, Any]:
        """PUT the object with `change` merged into its spec. The running controller may write the
        object between our read and our PUT (a finalizer, a status), so a 409 is retried on a fresh read."""
        for _ in range(10):
            obj = self.get(kind, name)
            obj["spec"] = {**obj["spec"], **change}
            try:
                new = self.objects.replace_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURALS[kind], name, obj
                )
                return cast(dict[str, Any], new)
            except ApiException as error:
                if error.status != 409:
                    raise
                time.sleep(0.1)
        raise AssertionError(f"{kind} {name} kept changing under the PUT")

    def patch(self, kind: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        obj = self.objects.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURALS[kind], name, patch)
        return cast(dict[str, Any], obj)

    def patch_status(self, kind: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        obj = self.objects.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURALS[kind], name, {"status": status}
        )
        return cast(dict[str, Any], obj)


def rejection(call: Any) -> dict[str, Any]:
    """Run `call`, which must be refused as Invalid (422); return the Status the server sent."""
    with pytest.raises(ApiException) as info:
        call()
    assert info.value.status == 422, info.value.body
    status: dict[str, Any] = json.loads(info.value.body or "{}")
    assert status["reason"] == "Invalid", status
    return status


# When an object already breaks its OpenAPI schema (a required field, an enum), the API server skips
# the CEL rules and adds this cause; it names no field.
SKIPPED_RULES = "some validation rules were not checked because the object was invalid"


def causes(status: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (c.get("field", ""), c["message"]) for c in status["details"]["causes"] if SKIPPED_RULES not in c["message"]
    ]


@pytest.fixture(scope="module")
def api(control_plane: ControlPlane) -> Iterator[Api]:
    control_plane.kubectl("apply", "-f", CRDS)
    names = [f"crd/{plural}.{GROUP}" for plural in PLURALS.values()]
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names, timeout=90)
    namespace = RUN
    control_plane.kubectl("create", "namespace", namespace)
    api_client = config.new_client_from_config(config_file=str(control_plane.kubeconfig))  # type: ignore[no-untyped-call]
    suite = Api(api_client, namespace)
    # Established can come a moment before the new resources are served.
    deadline = time.monotonic() + 30
    while True:
        try:
            for plural in ("containercheckpoints", "containerrestores"):
                suite.objects.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
            suite.objects.list_cluster_custom_object(GROUP, VERSION, "checkpointstorages")
            break
        except ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        yield suite
    finally:
        selector = f"{SUITE_LABEL}={RUN}"
        suite.objects.delete_collection_cluster_custom_object(
            GROUP, VERSION, "checkpointstorages", label_selector=selector
        )
        # Storages are cluster-wide and some of these are marked default: the next module must not
        # find them. The controller's finalizer lets each go once its validation timer has stopped.

        def left() -> list[Any]:
            found = suite.objects.list_cluster_custom_object(
                GROUP, VERSION, "checkpointstorages", label_selector=selector
            )
            return list(found["items"])

        until("the suite's CheckpointStorages deleted", lambda: not left(), timeout=120)
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false")
        api_client.close()


@pytest.mark.parametrize("case", REJECTED, ids=[c.id for c in REJECTED])
def test_bad_object_is_rejected_with_a_message(api: Api, case: Rejected) -> None:
    status = rejection(lambda: api.create(case.kind, case.spec))
    found = causes(status)
    # Exactly the one rule the case breaks fires, on the field a person has to change.
    assert len(found) == 1, found
    field, message = found[0]
    assert field == case.field, found
    assert message.endswith(case.message), found
    assert case.message in status["message"]


@pytest.mark.parametrize(
    ("kind", "spec"),
    [(kind, spec) for kind, specs in ACCEPTED.items() for spec in specs],
    ids=[f"{kind}-{i}" for kind, specs in ACCEPTED.items() for i in range(len(specs))],
)
def test_good_object_is_accepted(api: Api, kind: str, spec: dict[str, Any]) -> None:
    obj = api.create(kind, spec)
    defaults = {"deletionPolicy": "Delete"} if kind == "CheckpointStorage" else {}
    assert obj["spec"] == {**defaults, **spec}


def test_storage_deletion_policy_defaults_to_delete(api: Api) -> None:
    assert api.create("CheckpointStorage", CKS)["spec"]["deletionPolicy"] == "Delete"


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("ContainerCheckpoint", {"leaveRunning": True}, M_CCP_IMMUTABLE),
        ("ContainerCheckpoint", {"nodeName": "node-b"}, M_CCP_IMMUTABLE),
        ("ContainerCheckpoint", {"containers": ["web", "db"]}, M_CCP_IMMUTABLE),
        ("ContainerRestore", {"nodeName": "node-b"}, M_CRST_IMMUTABLE),
        ("ContainerRestore", {"source": {"checkpointRef": {"name": "web-2"}}}, M_CRST_IMMUTABLE),
    ],
)
def test_spec_is_immutable(api: Api, kind: str, change: dict[str, Any], message: str) -> None:
    name = api.create(kind, BASE[kind])["metadata"]["name"]

    status = rejection(lambda: api.replace_spec(kind, name, change))
    assert causes(status) == [("spec", f'Invalid value: "object": {message}')]
    status = rejection(lambda: api.patch(kind, name, {"spec": change}))
    assert causes(status) == [("spec", f'Invalid value: "object": {message}')]
    assert api.get(kind, name)["spec"] == BASE[kind]


def written_fields(obj: dict[str, Any], patched: dict[str, Any]) -> dict[str, Any]:
    """The status fields a test's patch wrote, as the object has them now. The running controller
    may have written its own status first (it fails an object for a node that does not exist)."""
    return {key: obj["status"].get(key) for key in patched}


def test_metadata_and_status_stay_writable(api: Api) -> None:
    name = api.create("ContainerCheckpoint", CCP)["metadata"]["name"]
    labelled = api.patch("ContainerCheckpoint", name, {"metadata": {"labels": {"checkpointer.dev/node": "node-a"}}})
    assert labelled["metadata"]["labels"]["checkpointer.dev/node"] == "node-a"
    assert labelled["metadata"]["generation"] == 1
    scheduled = {"phase": "Scheduled", "nodeName": "node-a"}
    obj = api.patch_status("ContainerCheckpoint", name, scheduled)
    assert written_fields(obj, scheduled) == scheduled


def test_undeclared_status_fields_are_pruned_and_podman_stats_kept(api: Api) -> None:
    name = api.create("ContainerCheckpoint", {**CCP, "containers": ["web", "db"], "export": {}})["metadata"]["name"]
    stats = {
        "podman_checkpoint_duration": 612345,
        "container_statistics": [{"id": "3f2a", "freezing_time": 1}],
    }
    condition = {
        "type": "Ready",
        "status": "True",
        "reason": "Succeeded",
        "message": "",
        "lastTransitionTime": "2025-01-01T00:00:00Z",
        "observedGeneration": 1,
    }
    archive = {
        "container": "web",
        "containerID": "3f2a" * 16,
        "uri": "s3://checkpoints/default/web-1-0a1b2c3d/web.tar.zst",
        "key": "default/web-1-0a1b2c3d/web.tar.zst",
        "size": 5_000_000_000,
        "sha256": SHA,
        "compression": "zstd",
        "stats": stats,
    }
    status = {
        "phase": "Succeeded",
        "observedGeneration": 1,
        "nodeName": "node-a",
        "storageRef": {"name": "s3"},
        "startTime": "2025-01-01T00:00:00Z",
        "completionTime": "2025-01-01T00:00:09Z",
        "progress": {"bytesDone": 5_000_000_000, "bytesTotal": 5_000_000_000},
        "conditions": [condition],
        "archives": [archive, {"container": "db", "size": 42}],
    }
    written = api.patch_status(
        "ContainerCheckpoint",
        name,
        {**status, "bogus": "x", "archives": [{**archive, "bogus": 1}, {"container": "db", "size": 42}]},
    )
    assert written_fields(written, status) == status
    assert "bogus" not in written["status"]
    assert written_fields(api.get("ContainerCheckpoint", name), status) == status

    restore = api.create("ContainerRestore", CRST)["metadata"]["name"]
    restore_status = {
        "phase": "Succeeded",
        "archive": {
            "storageRef": {"name": "s3"},
            "key": archive["key"],
            "sha256": SHA,
            "compression": "zstd",
        },
        "containerID": "9c" * 32,
        "containerName": "web",
        "stats": {"runtime_restore_duration": 1234, "anything": {"nested": True}},
        "conditions": [condition],
    }
    written = api.patch_status("ContainerRestore", restore, {**restore_status, "extra": {"a": 1}})
    assert written_fields(written, restore_status) == restore_status
    assert "extra" not in written["status"]


@pytest.mark.parametrize(
    ("kind", "status", "message"),
    [
        ("ContainerCheckpoint", {"phase": "Done"}, 'Unsupported value: "Done"'),
        ("ContainerRestore", {"phase": "Checkpointing"}, 'Unsupported value: "Checkpointing"'),
        (
            "ContainerCheckpoint",
            {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "Yes",
                        "reason": "X",
                        "message": "",
                        "lastTransitionTime": "2025-01-01T00:00:00Z",
                    }
                ]
            },
            'Unsupported value: "Yes"',
        ),
        ("ContainerCheckpoint", {"conditions": [{"type": "Ready", "status": "True"}]}, "Required value"),
    ],
)
def test_status_is_validated_too(api: Api, kind: str, status: dict[str, Any], message: str) -> None:
    name = api.create(kind, BASE[kind])["metadata"]["name"]
    refused = rejection(lambda: api.patch_status(kind, name, status))
    assert message in refused["message"]


def kubectl_table(control_plane: ControlPlane, *args: str) -> list[dict[str, str]]:
    """`kubectl get` output as rows of {HEADER: cell}, cut at the header's column starts."""
    lines = control_plane.kubectl("get", *args).stdout.splitlines()
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    names = [header[a:b].strip() for a, b in bounds]
    return [{n: line[a:b].strip() for n, (a, b) in zip(names, bounds, strict=True)} for line in lines[1:]]


def test_printer_columns_and_category(api: Api, control_plane: ControlPlane) -> None:
    ns = ("-n", api.namespace)
    name = api.create("ContainerCheckpoint", {**CCP, "containers": ["web", "db"], "export": {}})["metadata"]["name"]
    api.patch_status(
        "ContainerCheckpoint",
        name,
        {
            "phase": "Succeeded",
            "archives": [{"container": "web", "size": 1234}, {"container": "db", "size": 42}],
        },
    )
    [row] = kubectl_table(control_plane, "ccp", name, *ns)
    assert list(row) == ["NAME", "PHASE", "NODE", "CONTAINERS", "SIZE", "AGE"]
    # The API server's table printer shows only the first element of a [*] path.
    assert row | {"AGE": ""} == {
        "NAME": name,
        "PHASE": "Succeeded",
        "NODE": "node-a",
        "CONTAINERS": "web",
        "SIZE": "1234",
        "AGE": "",
    }

    restore = api.create("ContainerRestore", CRST)["metadata"]["name"]
    api.patch_status("ContainerRestore", restore, {"phase": "Restoring", "containerName": "web-restored"})
    by_archive = api.create("ContainerRestore", {"nodeName": "node-b", "source": {"archive": ARCHIVE}})
    rows = kubectl_table(control_plane, "crst", restore, by_archive["metadata"]["name"], *ns)
    assert list(rows[0]) == ["NAME", "PHASE", "NODE", "CHECKPOINT", "ARCHIVE", "CONTAINER", "AGE"]
    assert rows[0] | {"AGE": ""} == {
        "NAME": restore,
        "PHASE": "Restoring",
        "NODE": "node-a",
        "CHECKPOINT": "web-1",
        "ARCHIVE": "",
        "CONTAINER": "web-restored",
        "AGE": "",
    }
    assert rows[1]["CHECKPOINT"] == ""
    assert rows[1]["ARCHIVE"] == ARCHIVE["key"]

    storage = api.create("CheckpointStorage", {**CKS, "endpoint": "http://127.0.0.1:8333", "default": True})
    [row] = kubectl_table(control_plane, "cks", storage["metadata"]["name"])
    assert row | {"AGE": ""} == {
        "NAME": storage["metadata"]["name"],
        "BUCKET": "checkpoints",
        "ENDPOINT": "http://127.0.0.1:8333",
        "DEFAULT": "true",
        "PHASE": "",
        "AGE": "",
    }

    everything = control_plane.kubectl("get", "checkpointer", *ns, "-o", "name").stdout
    assert f"containercheckpoint.checkpointer.dev/{name}" in everything
    assert f"containerrestore.checkpointer.dev/{restore}" in everything


def test_kubectl_explain_names_the_podman_flags(control_plane: ControlPlane, api: Api) -> None:
    out = control_plane.kubectl("explain", "ccp.spec.compress").stdout
    assert "--compress" in out
    assert "zstd" in out
    out = control_plane.kubectl("explain", "crst.spec.previous").stdout
    assert "--import-previous" in out
    out = control_plane.kubectl("explain", "cks.spec.deletionPolicy").stdout
    assert "Retain" in out
