#!/bin/busybox sh
# /init of the roam guest initramfs (installed by scripts/guest-image.sh).
# PID 1: mount the pseudo file systems, load the virtio modules in the order
# written at build time, mount the data file system, start the agent (respawned
# if it dies), bring up eth0 by DHCP if there is a NIC, print the ready marker
# and keep a shell on the console.
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

# The guest LAN (docs/network.md, "Guest virtual LAN"): when there is a NIC,
# ask for an address by DHCP in the background (the ready marker does not
# wait for it). udhcpc stays running to renew the lease; a guest without a
# lease after a few seconds simply has no network. The event script prints
# the address on the console.
if [ -e /sys/class/net/eth0 ]; then
    cat >/run/roam/udhcpc.sh <<'SCRIPT'
#!/bin/sh
# udhcpc event script: $1 is deconfig, bound, renew, nak or leasefail.
bits() {
    n=0
    for o in $(echo "$1" | tr . ' '); do
        case $o in
        255) n=$((n + 8)) ;; 254) n=$((n + 7)) ;; 252) n=$((n + 6)) ;;
        248) n=$((n + 5)) ;; 240) n=$((n + 4)) ;; 224) n=$((n + 3)) ;;
        192) n=$((n + 2)) ;; 128) n=$((n + 1)) ;;
        esac
    done
    echo $n
}
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set dev "$interface" up
    ;;
bound | renew)
    # `replace` keeps an unchanged address (and the connections using it).
    ip addr replace "$ip/${mask:-$(bits "${subnet:-255.255.255.0}")}" dev "$interface"
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    gw="${router%% *}"
    [ -n "$gw" ] && ip route replace default via "$gw" dev "$interface"
    echo "ROAM-NET: $interface $ip/${mask:-$(bits "${subnet:-255.255.255.0}")} $1 lease ${lease}s router ${gw:-none}" >/dev/console
    if [ "$1" = bound ] && [ -n "$gw" ]; then
        (ping -c 1 -W 2 "$gw" >/dev/null 2>&1 &&
            echo "ROAM-NET: gateway $gw answers ping" >/dev/console) &
    fi
    ;;
esac
exit 0
SCRIPT
    chmod 0755 /run/roam/udhcpc.sh
    (
        ip link set dev eth0 up
        udhcpc -i eth0 -n -t 3 -T 1 -O mtu -s /run/roam/udhcpc.sh >/dev/null 2>&1 ||
            echo "ROAM-NET: eth0 no DHCP lease"
    ) &
fi

# A TCP echo service on port 7 when the kernel command line asks for it
# (roamd adds roam.echo=1 for VMs with a NIC): the lab's proof that a
# correspondent's connection survives a migration. busybox nc -ll -e forks
# one `cat` per connection and keeps listening.
if grep -qw roam.echo=1 /proc/cmdline; then
    (
        while true; do
            nc -ll -p 7 -e /bin/cat
            sleep 0.2
        done
    ) >/dev/null 2>&1 &
    echo "ROAM-NET: echo service on tcp port 7"
fi

echo "ROAM-GUEST-READY"
while true; do
    setsid cttyhack sh -l
    sleep 0.2
done
