#!/usr/bin/env bash
# Builds the Debian trixie rootfs every simulated node runs in (podman 5, CRIU 4, runc,
# checkpointctl, nftables) and that also provides etcd for the control plane. Debian 12's CRIU 3.17
# fails on this kernel; trixie's CRIU 4.x works. Prints the rootfs path.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"
packages=(podman criu runc checkpointctl conmon netavark aardvark-dns catatonit nftables iproute2
  iptables etcd-server busybox-static ca-certificates util-linux procps zstd python3)
key=$(printf '%s\n' "${packages[@]}" | cat - "$0" | sha256sum | cut -c1-12)
rootfs=$CHECKPOINTER_CACHE/rootfs/trixie-$key
if [[ -f $rootfs/.complete ]]; then echo "$rootfs"; exit 0; fi

command -v debootstrap >/dev/null || {
  log "installing debootstrap"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}
mirror=$(sed -n 's#^URIs: *\(http[^ ]*/debian\)$#\1#p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
mirror=${mirror:-http://deb.debian.org/debian}
rm -rf "$rootfs" && mkdir -p "$(dirname "$rootfs")"
log "debootstrap trixie into $rootfs (first run takes a few minutes)"
debootstrap --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" trixie "$rootfs" "$mirror" >&2

# Podman's configuration (runc, cgroupfs, storage paths) is given to each node by
# hack/localenv/nodes.py, which bind-mounts it over /etc/containers.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb
touch "$rootfs/.complete"
echo "$rootfs"
