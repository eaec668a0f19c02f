"""checkpointer: checkpoint containers with podman and CRIU into S3-compatible storage, restore anywhere."""

GROUP = "checkpointer.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
NODE_LABEL = f"{GROUP}/node"
