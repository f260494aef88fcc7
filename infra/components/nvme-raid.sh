#!/bin/bash
# Managed by deepfleet (Pulumi GPU user data, see docs/pulumi.md): make one ext4 file system,
# labelled deepfleet-nvme, out of this instance's local NVMe instance-store drives (RAID0 with
# mdadm when there are several). The .mount unit next to this script's service mounts it.
#
#   deepfleet-nvme-raid DRIVES     DRIVES: how many instance-store drives the type has
#
# Runs on every boot and does nothing when the file system exists: after a reboot the drives
# keep their data, after a stop/start EC2 hands back blank drives and this makes it again.
# It formats only blank drives: any signature on one (a file system, a stray RAID member) stops
# it with a message instead.
set -euo pipefail

label=deepfleet-nvme
array=/dev/md/deepfleet-nvme
expected=${1:?usage: deepfleet-nvme-raid DRIVES}
# Overridable for tests only.
sysfs=${DEEPFLEET_SYSFS:-/sys}
wait_s=${DEEPFLEET_NVME_WAIT_S:-60}

log() { echo "deepfleet-nvme-raid: $*"; }

# Instance-store drives by their NVMe model; EBS volumes (the root disk) say
# "Amazon Elastic Block Store".
instance_store_drives() {
    local model name
    for model in "$sysfs"/block/nvme*/device/model; do
        [ -e "$model" ] || continue
        if grep -q "Amazon EC2 NVMe Instance Storage" "$model"; then
            name=${model%/device/model}
            echo "/dev/${name##*/}"
        fi
    done
}

if blkid -L "$label" >/dev/null 2>&1; then
    log "file system $label exists: nothing to do"
    exit 0
fi

# udev may still be naming the drives early in boot.
drives=()
for ((waited = 0; ; waited++)); do
    mapfile -t drives < <(instance_store_drives)
    if [ "${#drives[@]}" -ge "$expected" ] || [ "$waited" -ge "$wait_s" ]; then
        break
    fi
    sleep 1
done
if [ "${#drives[@]}" -ne "$expected" ]; then
    log "found ${#drives[@]} instance-store NVMe drives (${drives[*]:-none}), expected $expected:" \
        "check the instance type, or \`nvme list\`" >&2
    exit 1
fi

# After a reboot the array is normally assembled by udev before this runs; if not, assemble it.
if [ "${#drives[@]}" -gt 1 ] \
    && [ "$(blkid -p -o value -s TYPE "${drives[0]}" || true)" = linux_raid_member ]; then
    mdadm --assemble --scan || true
    udevadm settle
    if blkid -L "$label" >/dev/null 2>&1; then
        log "assembled the existing array holding $label"
        exit 0
    fi
fi

for drive in "${drives[@]}"; do
    # blkid -p exits 2 when the drive carries no signature at all: the only state we format.
    status=0
    signature=$(blkid -p -o export "$drive") || status=$?
    if [ "$status" -ne 2 ]; then
        log "$drive is not blank (${signature//$'\n'/ }): refusing to overwrite it;" \
            "wipe it with \`wipefs -a $drive\` if its data is not needed" >&2
        exit 1
    fi
done

target=${drives[0]}
if [ "${#drives[@]}" -gt 1 ]; then
    mdadm --create "$array" --name="$label" --level=0 --raid-devices="${#drives[@]}" \
        --run "${drives[@]}"
    target=$array
fi
# No reserved blocks (a cache, not a system disk); no discard: EC2 hands instance store over
# trimmed, and discarding tens of TB first takes minutes.
mkfs.ext4 -q -F -L "$label" -m 0 -E nodiscard "$target"
udevadm settle
log "made $label on $target from ${drives[*]}"
