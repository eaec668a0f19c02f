"""The local test environment: a real control plane, podman/CRIU node sandboxes and an S3 server.

Everything here is started by the project's own code from the binaries that hack/build/tools.sh
and hack/node/rootfs.sh produce, and torn down without leaving processes or mounts behind.
"""
