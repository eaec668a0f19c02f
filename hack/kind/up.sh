#!/usr/bin/env bash
# Makes the kind cluster that `pytest tests/e2e/test_helm_nodes.py --cluster kind` runs the
# Helm-installed user story on (needs a Docker engine; run hack/install.sh first). Idempotent: an
# existing cluster is kept and brought up to date.
#   - kind, built from the Go module proxy into the tool cache when it is not on PATH;
#   - the node image (node.Containerfile): kind's node plus podman 5, CRIU 4.2.1 and runc, from the
#     Debian mirror of this machine's apt sources;
#   - the cluster (cluster.yaml): a control plane and two workers labelled checkpointer.dev/test-node;
#   - the operator image, built as the local environment builds it (Debian and PyPI packages,
#     hack/localenv/operator_image.py), loaded into every node's containerd: there is no registry;
#   - an S3 server (the Versity S3 Gateway the local environment runs) on the control-plane node,
#     reachable from the Pods and from this machine at that node's address;
#   - the release namespace (Pod Security privileged) and the Secret local-s3 in it, with the S3
#     credentials and, for the tests, where the server is.
# The chart itself is not installed: that is the tests' part, with helm alone.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib/common.sh"
name=${KIND_CLUSTER_NAME:-checkpointer}
# kind v0.30's node image for Kubernetes 1.34, the minor version of the local control plane.
KIND_VERSION=v0.30.0
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-kindest/node:v1.34.0}
namespace=checkpointer-system
s3_port=7070
s3_dir=/var/lib/checkpointer-s3

docker version --format '{{.Server.Version}}' >/dev/null || { log "kind needs a running Docker engine"; exit 1; }
kind=$(command -v kind || echo "$CHECKPOINTER_BIN/kind")
if [[ ! -x $kind ]]; then
  log "building kind $KIND_VERSION from the Go module proxy"
  GOBIN=$CHECKPOINTER_BIN CGO_ENABLED=0 go install "sigs.k8s.io/kind@$KIND_VERSION"
  kind=$CHECKPOINTER_BIN/kind
fi
kubectl=$CHECKPOINTER_BIN/kubectl
python=$REPO_ROOT/.venv/bin/python
[[ -x $kubectl && -x $python && -x $CHECKPOINTER_BIN/versitygw ]] || { log "run hack/install.sh first"; exit 1; }

node_image=checkpointer-kind-node:${KIND_NODE_IMAGE##*:}
log "building the node image $node_image"
mirror=$(debian_mirror)
docker build -t "$node_image" --build-arg "KIND_NODE_IMAGE=$KIND_NODE_IMAGE" --build-arg "DEBIAN_MIRROR=$mirror" \
  -f "$here/node.Containerfile" "$here"
if ! "$kind" get clusters | grep -qx "$name"; then
  "$kind" create cluster --name "$name" --image "$node_image" --config "$here/cluster.yaml" --wait 5m
fi
kubeconfig=$(mktemp)
trap 'rm -f "$kubeconfig"' EXIT
"$kind" get kubeconfig --name "$name" >"$kubeconfig"
k() { "$kubectl" --kubeconfig="$kubeconfig" "$@"; }

log "building the operator image and loading it into every node"
built=$(cd "$REPO_ROOT/hack" && "$python" -m localenv.operator_image)
read -r ref archive _ <<<"$built"
"$kind" load image-archive --name "$name" "$archive"

# The S3 server: a process of the control-plane node, with its data on the node's /var. Started anew
# with fresh credentials on every run; what it stored before stays.
control=$name-control-plane
log "starting the S3 server on $control"
docker cp "$CHECKPOINTER_BIN/versitygw" "$control:/usr/local/bin/versitygw"
docker exec "$control" sh -c 'for c in /proc/[0-9]*/comm; do
  [ "$(cat "$c" 2>/dev/null)" = versitygw ] && kill "$(basename "$(dirname "$c")")"; done; sleep 1'
access_key=AK$(od -An -N9 -tx1 /dev/urandom | tr -d ' \n' | tr a-f A-F)
secret_key=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
docker exec "$control" mkdir -p "$s3_dir/buckets"
docker exec -d -e "ROOT_ACCESS_KEY=$access_key" -e "ROOT_SECRET_KEY=$secret_key" -w "$s3_dir" "$control" \
  sh -c "exec versitygw --port :$s3_port --region us-east-1 posix $s3_dir/buckets >$s3_dir/versitygw.log 2>&1"
address=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$control")
endpoint=http://$address:$s3_port
# Up once it answers from this side, with the bucket made (the Pods reach the same address).
ENDPOINT=$endpoint ACCESS_KEY=$access_key SECRET_KEY=$secret_key "$python" - <<'PY'
import os, time
import boto3
s3 = boto3.client("s3", endpoint_url=os.environ["ENDPOINT"], region_name="us-east-1",
                  aws_access_key_id=os.environ["ACCESS_KEY"], aws_secret_access_key=os.environ["SECRET_KEY"])
deadline = time.monotonic() + 60
while True:
    try:
        if "checkpoints" not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket="checkpoints")
        break
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(1)
PY

k create namespace "$namespace" --dry-run=client -o yaml | k apply -f -
k label namespace "$namespace" pod-security.kubernetes.io/enforce=privileged --overwrite
k -n "$namespace" create secret generic local-s3 --dry-run=client -o yaml \
  --from-literal=accessKeyID="$access_key" --from-literal=secretAccessKey="$secret_key" \
  --from-literal=endpoint="$endpoint" --from-literal=bucket=checkpoints --from-literal=region=us-east-1 |
  k apply -f -
log "kind cluster $name ready: operator image $ref, S3 at $endpoint"
log "run: .venv/bin/pytest tests/e2e/test_helm_nodes.py --cluster kind"
