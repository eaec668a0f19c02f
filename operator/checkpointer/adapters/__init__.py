"""I/O lives here: Kubernetes, podman and S3. Services call these; handlers call services."""
