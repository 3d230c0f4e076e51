#!/usr/bin/env bash
# Installs the Debian packages kubehv's tests and demo need (idempotent: skips when present).
set -euo pipefail
# python3-venv: Debian's python3 has no ensurepip without it (`python3 -m venv` fails);
# gcc + python3-dev: libvirt-python ships only an sdist, built against libvirt-dev here.
# prometheus: its promtool tests manifests/monitoring's alert rules (`promtool test rules`).
# containerd ... debootstrap: the real kubelet node (kubehv/devenv/kubenode.py): container
# runtime, CNI plugins, kube-proxy's tools, and the rootfs of the image built without Docker.
PKGS=(qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
      libvirt-dev pkg-config gcc python3-dev python3-venv
      iproute2 busybox-static cpio gzip psmisc procps kmod
      prometheus
      containerd runc containernetworking-plugins iptables conntrack socat ethtool debootstrap
      dosfstools mtools syslinux syslinux-common fdisk ovmf dnsmasq-base openssh-client)
# debootstrap ... fdisk: the cloud-init test image (tests/guest/build-cloud-image.sh);
# ovmf: firmware: uefi; dnsmasq-base: DHCP of the node-local NAT network libvirt runs.
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
echo "kubehv: installing Debian packages: ${missing[*]}" >&2
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# No systemd here, and the tests start containerd (and libvirtd) by hand with their own
# config: keep the packages' init scripts from starting services (policy-rc.d, exit 101).
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
