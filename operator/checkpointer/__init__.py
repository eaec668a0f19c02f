"""checkpointer: checkpoint containers with podman and CRIU into S3-compatible storage, restore anywhere."""

GROUP = "checkpointer.dev"
VERSION = "v1alpha1"
NODE_LABEL = f"{GROUP}/node"


def kopf_prefix(role: str) -> str:
    """The prefix of a role's kopf annotations and finalizer: controller and agent keep theirs apart."""
    return f"{role}.{GROUP}"


def kopf_finalizer(role: str) -> str:
    return f"{kopf_prefix(role)}/finalizer"


# kopf's finalizer of the controller; the controller also sets it itself, in its scheduling patch.
CONTROLLER_FINALIZER = kopf_finalizer("controller")
