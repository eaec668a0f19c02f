#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 machine (root): Debian packages, the
# Python environment, the control plane and S3 server built from the Go module proxy, and the node
# rootfs. Every step is cached; a second run takes seconds.
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"
cd "$REPO_ROOT"

need=()
# mkfs.xfs and tc: the benchmark keeps the S3 server's files on XFS and shapes the link to it (see
# hack/bench/datapath.py). prometheus and promtool: the metrics test scrapes the local environment
# with a real Prometheus; tmux: the kubectl plugin's progress bar is tested in a real terminal.
for tool in debootstrap nsenter unshare gcc zstd mkfs.xfs tc age prometheus promtool tmux; do command -v "$tool" >/dev/null || need+=("$tool"); done
if ((${#need[@]})); then
  log "installing Debian packages for: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap util-linux gcc libc6-dev zstd xfsprogs iproute2 age prometheus tmux >/dev/null
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  log "creating .venv with $("$python" --version)"
  "$python" -m venv .venv
fi
stamp=.venv/.installed-$(inputs_hash pyproject.toml)
if [[ ! -f $stamp ]]; then
  log "installing checkpointer and its test tools into .venv"
  .venv/bin/pip install -q -U pip
  .venv/bin/pip install -q -e '.[test]'
  rm -f .venv/.installed-* && touch "$stamp"
fi

# With kubelet and kube-scheduler, and the rootfs of nodes with a kubelet (containerd, runc), for the
# Helm test (docs/local-environment.md).
CHECKPOINTER_KUBELET_NODES=1 bash hack/build/tools.sh
bash hack/node/rootfs.sh >/dev/null
CHECKPOINTER_KUBELET_NODES=1 bash hack/node/rootfs.sh >/dev/null
# The operator image's base rootfs (debootstrap, once); the image itself is made from the current
# sources by the test that runs it (hack/localenv/operator_image.py).
PYTHONPATH=hack .venv/bin/python -m localenv.operator_image --base >/dev/null
log "install complete"
