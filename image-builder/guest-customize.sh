#!/bin/sh
# mmdebstrap customize hook for build-guest.sh: runs in mmdebstrap's namespace with the new
# root as $1, after every package is installed and image-builder/guest/ is copied in, before
# mmdebstrap's own cleanup. Reads GUEST_ROOT_PARTUUID, GUEST_NVIDIA (0/1) and GUEST_INFO (a
# file outside the root that build-guest.sh reads back: kernel and driver versions).
# GUEST_NVIDIA_PKGS names the driver's packages, GUEST_DEBS the package cache to fill.
set -eu
root=$1
in_root() { chroot "$root" "$@"; }

# nvidia-open 550.163.01 (trixie, and trixie-backports' -4~bpo13+1) calls
# pci_resize_resource() with 3 arguments; Linux 6.12.117 (trixie) took a 4th, exclude_bars,
# from a stable backport, so DKMS's build fails. When exactly that is the case, the source
# DKMS builds from gets the 4th argument as 0 (no BAR excluded: the old behaviour), and the
# packages are configured again. Prints what it patched.
nvidia_pci_resize_fix() {
  src=$(find "$root/usr/src" -maxdepth 1 -name 'nvidia-current-open-*' | head -n 1)
  [ -n "$src" ] && [ -f "$src/nvidia/nv-pci.c" ] || return 1
  grep -qs 'exclude_bars' "$root"/usr/src/linux-headers-*-common/include/linux/pci.h || return 1
  grep -q 'pci_resize_resource(pci_dev, NV_GPU_BAR1, requested_size);' "$src/nvidia/nv-pci.c" || return 1
  sed -i 's/pci_resize_resource(pci_dev, NV_GPU_BAR1, requested_size);/pci_resize_resource(pci_dev, NV_GPU_BAR1, requested_size, 0);/' \
    "$src/nvidia/nv-pci.c"
  echo "${src#"$root"}/nvidia/nv-pci.c: pci_resize_resource() given exclude_bars=0 (Linux 6.12.117+)"
}

nvidia_patch=none
if [ "$GUEST_NVIDIA" = 1 ]; then
  # shellcheck disable=SC2086 # a list of package names
  if ! in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    $GUEST_NVIDIA_PKGS >&2; then
    if nvidia_patch=$(nvidia_pci_resize_fix); then
      echo "DKMS failed on a known incompatibility; patched: $nvidia_patch" >&2
      in_root env DEBIAN_FRONTEND=noninteractive dpkg --configure -a >&2 || nvidia_patch=failed
    else
      nvidia_patch=failed
    fi
    if [ "$nvidia_patch" = failed ]; then
      echo "installing the NVIDIA driver failed; DKMS's build log:" >&2
      tail -n 100 "$root"/var/lib/dkms/*/*/build/make.log >&2 || true
      exit 1
    fi
  fi
fi
# What apt downloaded, for the next build (mmdebstrap's cleanup empties the chroot's cache).
cp -an "$root/var/cache/apt/archives/"*.deb "$GUEST_DEBS/" 2>/dev/null || true

# One kernel, the one linux-image-amd64 pulled in; /vmlinuz and /initrd.img point at it
# (GRUB's config boots those links, so a kernel upgrade in the guest keeps booting).
kver=$(ls "$root/lib/modules")
[ "$(printf '%s\n' "$kver" | wc -l)" = 1 ] || { echo "expected one kernel, found: $kver" >&2; exit 1; }
if [ ! -e "$root/vmlinuz" ] || [ ! -e "$root/initrd.img" ]; then
  echo "no /vmlinuz or /initrd.img links" >&2; exit 1
fi
# The initramfs must reach the root disk through virtio: each module built into the kernel
# or in the initramfs.
in_root lsinitramfs "/boot/initrd.img-$kver" >"$root/tmp/initrd.list"
for m in virtio_pci virtio_blk ext4; do
  grep -q "/$m.ko" "$root/lib/modules/$kver/modules.builtin" "$root/tmp/initrd.list" ||
    { echo "$m is neither built into $kver nor in its initramfs" >&2; exit 1; }
done

cat >"$root/etc/fstab" <<FSTAB
# The root partition (GPT partition UUID fixed by image-builder/build-guest.sh).
PARTUUID=$GUEST_ROOT_PARTUUID / ext4 errors=remount-ro 0 1
FSTAB
# cloud-init sets the VM's name from the seed; the build host's name must not leak in.
echo localhost >"$root/etc/hostname"
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"

in_root systemctl enable systemd-networkd.service systemd-resolved.service >/dev/null 2>&1
# The host keys on the serial console at every boot and when they change (the agent learns
# them there); guest/ went in as 0644 files.
chmod 0755 "$root/usr/local/sbin/qudata-print-host-keys"
in_root systemctl enable qudata-host-keys.service qudata-host-keys.path >/dev/null 2>&1
# Boot time under TCG and no surprise package runs: periodic jobs off.
for unit in apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer \
  e2scrub_reap.service fstrim.timer dpkg-db-backup.timer; do
  if [ -e "$root/usr/lib/systemd/system/$unit" ] || [ -e "$root/lib/systemd/system/$unit" ]; then
    in_root systemctl mask "$unit" >/dev/null 2>&1
  fi
done

# Host keys are made at first boot (cloud-init's cc_ssh): every VM gets its own.
rm -f "$root"/etc/ssh/ssh_host_*
# No password anywhere: every account's password field locked.
awk -F: '$2 !~ /^[*!]/ { bad = 1; print "account " $1 " has a password field: " $2 > "/dev/stderr" } END { exit bad }' \
  "$root/etc/shadow"

if [ "$GUEST_NVIDIA" = 1 ]; then
  # Asked inside the image. Debian names the module nvidia-current-open (its modprobe.d turns
  # `modprobe nvidia` into `modprobe nvidia-current-open`, which modinfo does not follow).
  nv="" nvname=""
  for name in nvidia nvidia-current-open nvidia-current; do
    nv=$(in_root modinfo -k "$kver" -F version "$name" 2>/dev/null || true)
    if [ -n "$nv" ]; then nvname=$name; break; fi
  done
  [ -n "$nv" ] || { echo "no nvidia module for $kver: DKMS did not build it" >&2; ls -R "$root/lib/modules/$kver/updates" >&2 || true; exit 1; }
  nvfile=$(in_root modinfo -k "$kver" -F filename "$nvname")
  [ -f "$root$nvfile" ] || { echo "modinfo names $nvfile, which is not in the image" >&2; exit 1; }
  # shellcheck disable=SC2016 # dpkg-query's format, not the shell's
  driver=$(in_root dpkg-query -W -f '${Version}' nvidia-driver)
else
  nv=none nvfile=none driver=none
fi
jupyter=$(in_root jupyter lab --version)
printf 'kernel: %s\nnvidia-driver: %s\nnvidia-module: %s\nnvidia-module-file: %s\nnvidia-module-patch: %s\njupyterlab: %s\n' \
  "$kver" "$driver" "$nv" "${nvfile#"$root"}" "$nvidia_patch" "$jupyter" >"$GUEST_INFO"
# shellcheck disable=SC2016 # dpkg-query's format, not the shell's
in_root dpkg-query -W -f '${Package}\t${Version}\n' >>"$GUEST_INFO.packages"

# Nothing of the build stays: logs, caches DKMS and Python left, /tmp (mmdebstrap then removes
# apt's lists and caches, /run and /tmp again, and empties /etc/machine-id).
find "$root/var/log" -type f -delete
rm -rf "$root"/var/lib/dkms/*/*/build "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old \
  "$root"/var/cache/man/* "$root"/tmp/* "$root"/var/tmp/*
