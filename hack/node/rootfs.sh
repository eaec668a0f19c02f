#!/usr/bin/env bash
# Builds the Debian trixie rootfs every simulated node runs in (podman 5.8, CRIU 4.2, runc,
# checkpointctl, nftables) and that also provides etcd for the control plane. Debian 12's CRIU 3.17
# fails on this kernel; trixie's CRIU 4.1 works but cannot dump inet sockets on Linux >= 6.16, so
# CRIU comes from forky; trixie's podman 5.4 follows a container's symlinks from the node's side, so
# podman comes from forky too. Prints the rootfs path.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"
packages=(podman criu runc checkpointctl conmon netavark aardvark-dns catatonit nftables iproute2
  iptables etcd-server busybox-static ca-certificates util-linux procps zstd python3)
# Packages pinned from forky (Debian testing) with an apt preference; the rest of the rootfs stays trixie.
# CRIU 4.2 is the first that dumps inet sockets on Linux >= 6.16 (4.1 fails with "Can't get 1:16
# opt"); it needs forky's libcompel1, libnl-3-200 and libnet9.
forky=(criu libcompel1 libnl-3-200 libnet9)
# Podman 5.8: before 5.8.2 a live export copies the running container's root file system changes
# from the node's side, following the symlinks the container swaps in (an archive could carry the
# node's files), and an import writes through the symlinks an archive brings. It needs forky's glibc
# 2.43 (for libsubid6), and libgpgme45 and libc-gconv-modules-extra, which only forky has.
forky+=(podman libc6 libc-bin libc-gconv-modules-extra libgpgme45 libsubid6)
# Nodes with a kubelet (opt-in, docs/local-environment.md): containerd 2.1 and runc for the kubelet's
# pods, and the CNI plugins for their loopback-only Pod networks. Trixie's plugins (1.1) lack `tap`,
# which gives a Pod's own network namespace the eth0 address containerd insists on, on a device that
# leads nowhere (hack/localenv/kubelet.py).
if [[ ${CHECKPOINTER_KUBELET_NODES:-} == 1 ]]; then
  forky+=(containerd runc containernetworking-plugins)
fi
key=$(printf '%s\n' "${packages[@]}" "${forky[@]}" | cat - "$0" | sha256sum | cut -c1-12)
rootfs=$CHECKPOINTER_CACHE/rootfs/trixie-$key
if [[ -f $rootfs/.complete ]]; then echo "$rootfs"; exit 0; fi
# Two environments coming up at once would otherwise debootstrap into the same directory.
mkdir -p "$(dirname "$rootfs")"
exec 9>"$rootfs.lock"
flock 9
if [[ -f $rootfs/.complete ]]; then echo "$rootfs"; exit 0; fi

command -v debootstrap >/dev/null || {
  log "installing debootstrap"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}
mirror=$(debian_mirror)
rm -rf "$rootfs" && mkdir -p "$(dirname "$rootfs")"
log "debootstrap trixie into $rootfs (first run takes a few minutes)"
debootstrap --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" trixie "$rootfs" "$mirror" >&2

if ((${#forky[@]})); then
  log "installing ${forky[*]} from forky"
  # forky's Release file carries a Valid-Until that a mirror snapshot may outlive.
  echo "deb [check-valid-until=no] $mirror forky main" >"$rootfs/etc/apt/sources.list.d/forky.list"
  # Priority 100: nothing else moves to forky; 990: these packages do, as far as they need to.
  printf 'Package: *\nPin: release n=forky\nPin-Priority: 100\n\nPackage: %s\nPin: release n=forky\nPin-Priority: 990\n' \
    "${forky[*]}" >"$rootfs/etc/apt/preferences.d/forky"
  # No service starts in the chroot.
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d" && chmod +x "$rootfs/usr/sbin/policy-rc.d"
  chroot "$rootfs" apt-get update -qq >&2
  chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${forky[@]}" >&2
  rm -f "$rootfs/usr/sbin/policy-rc.d"
  rm -rf "$rootfs"/var/lib/apt/lists/*
fi
criu=$(chroot "$rootfs" criu --version | sed -n 's/^Version: //p')
[[ $criu == 4.2* ]] || { log "CRIU in the rootfs is ${criu:-missing}, not 4.2"; exit 1; }
podman=$(chroot "$rootfs" dpkg-query -W -f '${Version}' podman 2>/dev/null || true)
[[ $podman == 5.8.* ]] || { log "podman in the rootfs is ${podman:-missing}, not 5.8"; exit 1; }

# Podman's configuration (runc, cgroupfs, storage paths) is given to each node by
# hack/localenv/nodes.py, which bind-mounts it over /etc/containers.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb
touch "$rootfs/.complete"
echo "$rootfs"
