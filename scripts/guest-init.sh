#!/bin/busybox sh
# /init of the roam guest initramfs (installed by scripts/guest-image.sh).
# PID 1: mount the pseudo file systems, load the virtio modules in the order
# written at build time, mount the data file system, start the agent (respawned
# if it dies), print the ready marker and keep a shell on the console.
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /data /sbin /usr/bin /usr/sbin
/bin/busybox mount -t devtmpfs devtmpfs /dev
# The kernel found no /dev/console in the archive, so stdio is not open yet.
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp

while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$mod" || echo "roam-init: insmod $mod failed"
done </etc/roam-modules

ip link set lo up

# /dev/vda: an ext4 file system in its first part (see docs/guest.md), a raw
# write log at its end. A disk without a file system is fine: no /data.
i=0
while [ ! -b /dev/vda ] && [ $i -lt 20 ]; do sleep 0.05; i=$((i + 1)); done
if [ -b /dev/vda ]; then
    if mount -t ext4 -o rw,noatime /dev/vda /data 2>/dev/null; then
        echo "roam-init: /dev/vda mounted at /data"
    else
        echo "roam-init: /dev/vda has no ext4 file system; /data not mounted"
    fi
fi

# The agent keeps its boot id in /run (tmpfs), so a respawn within one boot
# reports the same id; a new boot starts with an empty /run.
mkdir -p /run/roam
(
    while true; do
        /bin/roam-agent
        echo "roam-init: roam-agent exited ($?); restarting"
        sleep 0.2
    done
) &

echo "ROAM-GUEST-READY"
while true; do
    setsid cttyhack sh -l
    sleep 0.2
done
