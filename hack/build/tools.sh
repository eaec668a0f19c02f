#!/usr/bin/env bash
# Builds the control plane (kube-apiserver, kube-controller-manager, kubectl), helm and the S3
# server (the Versity S3 Gateway, `versitygw`) from the Go module proxy into $CHECKPOINTER_BIN; with
# CHECKPOINTER_KUBELET_NODES=1 also the kubelet, kube-scheduler and the OCI registry.
# Each build is skipped when its go.mod, go.sum and flags have not changed since the last build.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"
here=$REPO_ROOT/hack/build
mkdir -p "$CHECKPOINTER_BIN"
export CGO_ENABLED=0 GOFLAGS=-mod=mod

build() { # build <module dir> <binary name> <package> [ldflags]
  local dir=$here/$1 name=$2 pkg=$3 ldflags=${4:-}
  local stamp=$CHECKPOINTER_BIN/.$name.$(inputs_hash "$dir/go.mod" "$dir/go.sum" <(echo "$pkg $ldflags"))
  if [[ -x $CHECKPOINTER_BIN/$name && -f $stamp ]]; then return; fi
  log "building $name (first run takes several minutes)"
  (cd "$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$CHECKPOINTER_BIN/$name.tmp" "$pkg")
  mv "$CHECKPOINTER_BIN/$name.tmp" "$CHECKPOINTER_BIN/$name"
  rm -f "$CHECKPOINTER_BIN/.$name".* && touch "$stamp"
}

minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
k8s_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

build kubernetes kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$k8s_ldflags"
build kubernetes kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$k8s_ldflags"
build kubernetes kubectl k8s.io/kubernetes/cmd/kubectl "$k8s_ldflags"
# Nodes with a kubelet (opt-in while that environment is new, docs/local-environment.md): the kubelet
# and kube-scheduler come from the same wrapper module and version as kube-apiserver.
# The OCI registry their kubelets pull from is the CNCF distribution registry (Apache-2.0).
if [[ ${CHECKPOINTER_KUBELET_NODES:-} == 1 ]]; then
  build kubernetes kubelet k8s.io/kubernetes/cmd/kubelet "$k8s_ldflags"
  build kubernetes kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$k8s_ldflags"
  build registry registry github.com/distribution/distribution/v3/cmd/registry \
    "-X github.com/distribution/distribution/v3/version.version=v3.1.2"
fi
# Helm's default Kubernetes version (for `helm template` and lint) is that of its client-go, 1.34.
helm_ldflags="-X helm.sh/helm/v3/internal/version.version=v3.19.5 -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=34"
done
build helm helm helm.sh/helm/v3/cmd/helm "$helm_ldflags"
build versitygw versitygw github.com/versity/versitygw/cmd/versitygw
log "tools ready in $CHECKPOINTER_BIN"
