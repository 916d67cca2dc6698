#!/usr/bin/env bash
# Install and start what Omega needs on a Debian/Ubuntu host (idempotent).
#   scripts/host-setup.sh packages   apt packages + the libvirt-qemu user
#   scripts/host-setup.sh services   start virtlogd and libvirtd without systemd
set -euo pipefail

PACKAGES=(
  qemu-system-x86 qemu-utils ovmf swtpm
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-system libvirt-clients libvirt-dev
  pkg-config gcc python3-venv python3-dev libssl-dev
  busybox-static cpio linux-image-amd64 kmod
  nbdkit libnbd-bin python3-libnbd fio
  chromium etcd-server iproute2 procps
)
# Wanted where the distribution has them; the build works without them.
#   libipsec-mb-dev: Intel's AES-GCM with VAES for sealing pages and blocks
#   (x86-64 only; without it the native code seals with OpenSSL)
OPTIONAL=()
[ "$(uname -m)" = x86_64 ] && OPTIONAL+=(libipsec-mb-dev)

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "host-setup: installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  for p in "${OPTIONAL[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" && continue
    echo "host-setup: installing $p (optional)"
    { [ ${#missing[@]} -gt 0 ] || as_root apt-get update -qq; } && as_root env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "$p" ||
      echo "host-setup: $p is not available here; going on without it" >&2
    missing+=("$p")
  done
  if ! getent passwd libvirt-qemu >/dev/null; then
    echo "host-setup: creating the libvirt-qemu user"
    getent group kvm >/dev/null || as_root groupadd --system kvm
    as_root useradd --system --no-create-home --shell /usr/sbin/nologin -g kvm libvirt-qemu
  fi
}

wait_for() {  # wait_for PATH SECONDS
  local i
  for i in $(seq 1 $(( $2 * 10 ))); do [ -S "$1" ] && return 0; sleep 0.1; done
  echo "host-setup: $1 did not appear within $2 s" >&2; return 1
}

services() {
  as_root mkdir -p /run/libvirt /var/log/libvirt/qemu
  if ! pgrep -x virtlogd >/dev/null; then
    echo "host-setup: starting virtlogd"
    as_root virtlogd -d
  fi
  if ! pgrep -x libvirtd >/dev/null; then
    echo "host-setup: starting libvirtd"
    as_root libvirtd -d
  fi
  wait_for /run/libvirt/libvirt-sock 30
  wait_for /run/libvirt/virtlogd-sock 30 || true
}

case "${1:-}" in
  packages) packages ;;
  services) services ;;
  *) echo "usage: $0 packages|services" >&2; exit 2 ;;
esac
