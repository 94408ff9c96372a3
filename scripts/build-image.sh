#!/usr/bin/env bash
# Builds the systemd base image the molecule scenarios and the local farm run in.
# No container registry is reachable from CI, so the image is made from Debian's
# package mirror with debootstrap and `docker import`, never pulled.
#
# The image is tagged with a hash of this file: editing the recipe below is what
# triggers a rebuild, and an unchanged recipe reuses the cached image.
#
# Usage: build-image.sh IMAGE_NAME   (prints the image reference it made or reused)
set -euo pipefail

image_name=${1:?usage: build-image.sh IMAGE_NAME}
suite=bookworm
mirror=${PIFARM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
arch=$(dpkg --print-architecture)
# What an inference host needs before Ansible can manage it: systemd as PID 1,
# Python with apt bindings for the apt module, and tools the tests use.
packages=systemd,systemd-sysv,dbus,python3,python3-apt,ca-certificates,iproute2,procps,curl,less

recipe_hash=$(sha256sum "$0" | cut -c1-12)
tag="${image_name}:${suite}-${arch}-${recipe_hash}"

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi

rootfs=$(mktemp -d /var/tmp/pifarm-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "building $tag with debootstrap from $mirror (takes about a minute)" >&2
debootstrap --variant=minbase --arch="$arch" --include="$packages" "$suite" "$rootfs" "$mirror" >&2

# A container has no consoles, udev or hardware clock: masking these keeps
# systemd's boot short and its state `running` instead of `degraded`.
for unit in getty@tty1.service console-getty.service systemd-udevd.service \
            systemd-udev-trigger.service systemd-remount-fs.service \
            systemd-firstboot.service sys-kernel-config.mount dev-hugepages.mount; do
  ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done
# systemd generates a fresh machine-id per container at first boot.
: > "$rootfs/etc/machine-id"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb

tar -C "$rootfs" -c . | docker import \
  -c 'CMD ["/lib/systemd/systemd"]' \
  -c 'ENV container=docker' \
  - "$tag" >&2
docker tag "$tag" "${image_name}:${suite}"
echo "$tag"
