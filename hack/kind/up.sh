#!/usr/bin/env bash
# Brings up a kind cluster for the e2e suite (needs Docker and kind): builds the node image (podman +
# CRIU) and the operator image, loads them, runs SeaweedFS in the cluster's Docker network, installs
# the Helm chart with that storage, and writes hack/kind/env.json for `pytest --cluster=kind`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
name=${KIND_CLUSTER_NAME:-checkpointer}
docker build -t checkpointer-kind-node:latest -f "$here/node.Containerfile" "$here"
docker build -t checkpointer:dev -f "$root/Containerfile" "$root"
kind create cluster --name "$name" --image checkpointer-kind-node:latest --config "$here/cluster.yaml"
kind load docker-image --name "$name" checkpointer:dev
for image in counter memory; do
  # The workload images are the same docker-archives the local environment builds.
  archive=$(PYTHONPATH="$root/hack" "$root/.venv/bin/python" -c \
    "from localenv import images, nodes; print({i.ref.split('/')[-1].split(':')[0]: i.archive for i in images.workload_images(nodes.rootfs_path())}['$image'])")
  for node in $(kind get nodes --name "$name" | grep worker); do
    docker exec -i "$node" podman load <"$archive"
  done
done
docker run -d --name "$name-s3" --network kind chrislusf/seaweedfs server -s3 -s3.port=8333
kubectl create namespace checkpointer-system --dry-run=client -o yaml | kubectl apply -f -
helm upgrade --install checkpointer "$root/charts/checkpointer" -n checkpointer-system \
  --set image.repository=checkpointer --set image.tag=dev --set image.pullPolicy=Never \
  --set storage.create=true --set storage.bucket=checkpoints --set "storage.endpoint=http://$name-s3:8333" \
  --set storage.forcePathStyle=true --set storage.accessKeyID=any --set storage.secretAccessKey=any --wait
echo "kind cluster $name ready; run: .venv/bin/pytest tests/e2e --cluster=kind"
