#!/usr/bin/env bash
# Builds, once, the tiny test guest the real-libvirt tests boot: the Debian cloud kernel plus an
# initramfs holding busybox-static as /init (see tests/guest/init). Why this guest: it boots in
# about a second under TCG with direct kernel boot (no disk image), prints markers on its serial
# console that tests can count, loads the virtio balloon driver (so ballooning is real) and
# powers off on the ACPI power button (so graceful shutdown and libvirt's ACPI reboot are real).
#
# Output: the cache folder `${KUBEHV_CACHE:-~/.cache/kubehv}/guest/<key>/` with `vmlinuz`,
# `initrd.img` and `guest.env`; its path is the only thing printed on stdout. The key changes
# when the kernel package version, this script or the init script change. Safe to run from
# several sessions at once (flock); idempotent (a finished folder is reused as is).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${KUBEHV_CACHE:-$HOME/.cache/kubehv}/guest"
mkdir -p "$cache"
log() { echo "kubehv guest: $*" >&2; }

# Modules in load order: the virtio PCI transport, the balloon, then the ACPI power button and
# evdev (which gives the button a /dev/input/event* node the init script can wait on).
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_balloon
         button evdev)

kernel_package() {
  # The version the meta-package points at, e.g. linux-image-6.1.0-56-cloud-amd64.
  apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | awk '/Depends: linux-image-[0-9].*-cloud-amd64$/ {print $2; exit}'
}

pkg="$(kernel_package || true)"
if [ -z "$pkg" ]; then
  log "apt-cache does not know linux-image-cloud-amd64; running apt-get update"
  apt-get update -qq >&2
  pkg="$(kernel_package || true)"
fi
if [ -z "$pkg" ]; then
  # Offline with an empty apt list: reuse any guest built before.
  prev="$(ls -1d "$cache"/*/ 2>/dev/null | while read -r d; do [ -f "$d/.done" ] && echo "$d"; done | tail -1)"
  if [ -n "$prev" ]; then echo "${prev%/}"; exit 0; fi
  log "cannot find the Debian cloud kernel package (linux-image-cloud-amd64) in apt"; exit 1
fi
pkgver="$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')"
sum="$(cat "$0" "$here/init" /bin/busybox | sha256sum | cut -c1-12)"
key="${pkg#linux-image-}-${pkgver}-${sum}"
out="$cache/$key"
if [ -f "$out/.done" ]; then echo "$out"; exit 0; fi

exec 9>"$cache/.lock"
flock 9
if [ -f "$out/.done" ]; then echo "$out"; exit 0; fi

work="$(mktemp -d "$cache/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log "building $key (downloading $pkg $pkgver)"
(cd "$work" && apt-get download "$pkg" >/dev/null 2>"$work/apt.err") \
  || { cat "$work/apt.err" >&2; exit 1; }
dpkg -x "$work"/"$pkg"_*.deb "$work/pkg"
kver="${pkg#linux-image-}"
moddir="$work/pkg/lib/modules/$kver/kernel"

root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,lib/modules,tmp}
cp /bin/busybox "$root/bin/busybox"
install -m 0755 "$here/init" "$root/init"
for m in "${MODULES[@]}"; do
  f="$(find "$moddir" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -1)"
  if [ -z "$f" ]; then
    # Built into this kernel: nothing to load.
    grep -q "/$m.ko" "$work/pkg/lib/modules/$kver/modules.builtin" 2>/dev/null \
      || log "note: module $m not found in $pkg (assuming built in)"
    continue
  fi
  case "$f" in
    *.ko.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
    *.ko.gz) gzip -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
done
printf '%s\n' "${MODULES[@]}" >"$root/lib/modules/order"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 >"$work/initrd.img"

stage="$cache/.stage.$key.$$"
mkdir -p "$stage"
cp "$work/pkg/boot/vmlinuz-$kver" "$stage/vmlinuz"
mv "$work/initrd.img" "$stage/initrd.img"
cat >"$stage/guest.env" <<EOF
KERNEL_PACKAGE=$pkg
KERNEL_PACKAGE_VERSION=$pkgver
KERNEL_RELEASE=$kver
EOF
chmod 0644 "$stage"/*
chmod 0755 "$stage"
touch "$stage/.done"
rm -rf "$out"
mv "$stage" "$out"
log "built $out"
echo "$out"
