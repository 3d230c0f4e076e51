#!/usr/bin/env bash
# Builds, once, the real cloud-init test guest: a small bootable Debian bookworm disk (qcow2)
# made only from Debian packages -- debootstrap minbase + cloud-init + openssh-server +
# qemu-guest-agent + the cloud kernel -- that boots by BIOS from its own disk (syslinux on a
# FAT boot partition) and lets cloud-init's NoCloud datasource put an SSH key in. Why this
# way: no loop mounts (the machine may not allow them): the root filesystem is filled from a
# folder with `mkfs.ext4 -d`, the boot partition with mtools, the partitions are put together
# with dd + sfdisk on a plain file and the result converted with `qemu-img convert`.
#
# Kept minimal for TCG (no KVM here): NoCloud is the only datasource cloud-init probes, the
# initramfs holds only the virtio/ext4 modules, SSH host keys are ed25519 only.
#
# Output: `${KUBEHV_CACHE:-~/.cache/kubehv}/cloud-image/<key>/` with `disk.qcow2`,
# `disk.sha256` and `build.env` (cold build seconds); its path is the only line on stdout.
# The key is a content hash of this recipe (the script itself, which lists every package).
# Safe to run from several sessions at once (flock); a finished folder is reused as is.
set -euo pipefail

SUITE=bookworm
MIRROR="${KUBEHV_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES=(systemd-sysv udev cloud-init openssh-server qemu-guest-agent sudo ifupdown
          isc-dhcp-client iproute2 netbase ca-certificates)
KERNEL_PACKAGE=linux-image-cloud-amd64
INITRD_MODULES=(virtio_pci virtio_blk virtio_net virtio_console ext4 crc32c_generic)
BOOT_MIB=64
ROOT_MIB=1200

cache="${KUBEHV_CACHE:-$HOME/.cache/kubehv}/cloud-image"
mkdir -p "$cache"
log() { echo "kubehv cloud image: $*" >&2; }

key="$(sha256sum "$0" | cut -c1-16)"
out="$cache/$key"
if [ -f "$out/.done" ]; then echo "$out"; exit 0; fi
exec 9>"$cache/.lock"
flock 9
if [ -f "$out/.done" ]; then echo "$out"; exit 0; fi

for tool in debootstrap mkfs.ext4 mkfs.vfat mcopy syslinux sfdisk qemu-img; do
  command -v "$tool" >/dev/null || { log "missing tool $tool (make apt installs it)"; exit 1; }
done
mbr=/usr/lib/syslinux/mbr/mbr.bin
[ -f "$mbr" ] || { log "missing $mbr (package syslinux-common)"; exit 1; }

start=$(date +%s)
work="$(mktemp -d "$cache/.build.XXXXXX")"
root="$work/root"
cleanup() {
  for m in dev/pts dev sys proc; do umount -l "$root/$m" 2>/dev/null || true; done
  cp "$work"/*.log "$cache/" 2>/dev/null || true  # the last build's logs, for a failed build
  rm -rf "$work"
}
trap cleanup EXIT

# debootstrap only the base: its own configure order trips over python3 packages given to
# --include; apt in the chroot orders them right.
log "debootstrap $SUITE minbase"
debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" \
  >"$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; exit 1; }

# The initramfs: only what a virtio disk with ext4 needs (small = fast to unpack under TCG).
mkdir -p "$root/etc/initramfs-tools/conf.d"
echo "MODULES=list" >"$root/etc/initramfs-tools/conf.d/kubehv.conf"
echo "COMPRESS=gzip" >>"$root/etc/initramfs-tools/conf.d/kubehv.conf"
printf '%s\n' "${INITRD_MODULES[@]}" >>"$root/etc/initramfs-tools/modules"

mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
cat >"$root/usr/sbin/policy-rc.d" <<'EOF'
#!/bin/sh
exit 101
EOF
chmod 0755 "$root/usr/sbin/policy-rc.d"
log "installing ${PACKAGES[*]} $KERNEL_PACKAGE"
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  "${PACKAGES[@]}" "$KERNEL_PACKAGE" >"$work/packages.log" 2>&1 \
  || { tail -30 "$work/packages.log" >&2; exit 1; }
chroot "$root" apt-get clean
rm -f "$root/usr/sbin/policy-rc.d"
for m in dev/pts dev sys proc; do umount "$root/$m"; done

# Configuration: root on the second partition, serial console, NoCloud only, quick boot.
cat >"$root/etc/fstab" <<'EOF'
LABEL=root / ext4 defaults,noatime 0 1
EOF
echo "kubehv-guest" >"$root/etc/hostname"
cat >"$root/etc/cloud/cloud.cfg.d/90-kubehv.cfg" <<'EOF'
datasource_list: [NoCloud, None]
ssh_genkeytypes: [ed25519]
ssh_deletekeys: true
EOF
mkdir -p "$root/etc/network/interfaces.d"
printf 'auto lo\niface lo inet loopback\nsource /etc/network/interfaces.d/*\n' \
  >"$root/etc/network/interfaces"
rm -f "$root"/etc/ssh/ssh_host_*  # each guest gets its own (cloud-init makes them)
: >"$root/etc/machine-id"
rm -rf "$root"/usr/share/{doc,man,info,locale}/* "$root"/var/lib/apt/lists/* \
  "$root"/var/cache/apt/*.bin "$root"/var/log/*.log
# Units that only cost time in a test guest.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
            systemd-timesyncd.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
# A serial login getty is there by default (console=ttyS0); nothing else to enable.

kver="$(ls "$root/lib/modules" | head -1)"
boot="$work/boot.fat"
truncate -s "${BOOT_MIB}M" "$boot"
mkfs.vfat -n BOOT "$boot" >/dev/null
syslinux --install "$boot"
cat >"$work/syslinux.cfg" <<EOF
DEFAULT linux
PROMPT 0
TIMEOUT 0
SERIAL 0 115200
LABEL linux
  KERNEL vmlinuz
  APPEND initrd=initrd.img root=LABEL=root ro console=ttyS0 quiet panic=-1
EOF
export MTOOLS_SKIP_CHECK=1
mcopy -i "$boot" "$root/boot/vmlinuz-$kver" ::vmlinuz
mcopy -i "$boot" "$root/boot/initrd.img-$kver" ::initrd.img
mcopy -i "$boot" "$work/syslinux.cfg" ::syslinux.cfg

rootfs="$work/root.ext4"
mkfs.ext4 -q -L root -d "$root" "$rootfs" "${ROOT_MIB}M"

# Partition table on a plain file: 1 MiB gap, boot (FAT, bootable), root (ext4).
disk="$work/disk.raw"
total_mib=$((1 + BOOT_MIB + ROOT_MIB))
truncate -s "${total_mib}M" "$disk"
sfdisk -q "$disk" <<EOF
label: dos
start=1MiB, size=${BOOT_MIB}MiB, type=c, bootable
start=$((1 + BOOT_MIB))MiB, size=${ROOT_MIB}MiB, type=83
EOF
dd if="$mbr" of="$disk" bs=440 count=1 conv=notrunc status=none
dd if="$boot" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$rootfs" of="$disk" bs=1M seek=$((1 + BOOT_MIB)) conv=notrunc,sparse status=none

stage="$cache/.stage.$key.$$"
mkdir -p "$stage"
qemu-img convert -f raw -O qcow2 "$disk" "$stage/disk.qcow2"
sha256sum "$stage/disk.qcow2" | cut -d' ' -f1 >"$stage/disk.sha256"
cat >"$stage/build.env" <<EOF
KERNEL_RELEASE=$kver
BUILD_SECONDS=$(( $(date +%s) - start ))
EOF
chmod 0644 "$stage"/*
chmod 0755 "$stage"
touch "$stage/.done"
rm -rf "$out"
mv "$stage" "$out"
log "built $out in $(( $(date +%s) - start ))s"
echo "$out"
