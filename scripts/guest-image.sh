#!/usr/bin/env bash
# Builds the roam guest: a Debian cloud kernel and a small initramfs (busybox,
# virtio modules, /init, the static roam-agent), published at
#   ${ROAM_CACHE:-/var/cache/roam}/guest/current/{vmlinuz,initramfs.img,guest.json}
# Called by scripts/setup.sh; can be run alone:  bash scripts/guest-image.sh [--force]
#
# Cached by kernel version + agent binary hash + QEMU version + these scripts:
# a second run with nothing changed only rebuilds the agent (a no-op for cargo)
# and re-points nothing. Never touches the host's /boot or /lib/modules.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
# shellcheck source=scripts/guest-common.sh
. "$SCRIPT_DIR/guest-common.sh"

force=0
for arg in "$@"; do
    case "$arg" in
    --force) force=1 ;;
    *) die "guest-image.sh: unknown argument $arg" ;;
    esac
done

# Modules wanted in the guest; their dependencies are added from modinfo.
# Whatever the kernel has built in (modules.builtin) is skipped.
# virtio_balloon: free page hinting, so a migration skips the guest's free memory.
GUEST_MODULES="${ROAM_GUEST_MODULES:-virtio_pci virtio_blk virtio_console virtio_net virtio_rng virtio_balloon}"
GUEST_CMDLINE="${ROAM_GUEST_CMDLINE:-console=ttyS0 panic=-1 quiet}"
KERNEL_META="${ROAM_KERNEL_META:-linux-image-cloud-amd64}"

for tool in dpkg-deb modinfo cpio gzip sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is missing (run scripts/setup.sh)"
done
BUSYBOX="$(command -v busybox || true)"
[ -n "$BUSYBOX" ] || die "busybox is missing (apt package busybox-static)"
file_is_static() { ! LC_ALL=C readelf -l "$1" 2>/dev/null | grep -q 'Requesting program interpreter'; }

# Without the setup lock held by our caller, take it ourselves.
if [ "${ROAM_SETUP_LOCKED:-0}" != 1 ]; then
    mkdir -p "$ROAM_CACHE"
    exec 9>"$ROAM_CACHE/setup.lock"
    flock -w 900 9 || die "timed out waiting for $ROAM_CACHE/setup.lock"
fi

# ---- 1. the kernel ------------------------------------------------------------
roam_apt_prepare
kernel_pkg() {
    roam_apt_cache depends "$KERNEL_META" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}
KPKG="$(kernel_pkg || true)"
if [ -z "$KPKG" ]; then
    roam_apt_update
    KPKG="$(kernel_pkg || true)"
fi
[ -n "$KPKG" ] || die "cannot resolve $KERNEL_META to a versioned kernel package"
KVERSION="$(roam_apt_cache policy "$KPKG" | awk '$1 == "Candidate:" { print $2; exit }')"
[ -n "$KVERSION" ] && [ "$KVERSION" != "(none)" ] || die "no candidate version for $KPKG"

KDIR="$ROAM_CACHE/kernel/${KPKG}_${KVERSION}"
if [ ! -e "$KDIR/.complete" ]; then
    say "fetching $KPKG $KVERSION"
    rm -rf "$KDIR" "$KDIR.tmp"
    mkdir -p "$KDIR.tmp/dl"
    (cd "$KDIR.tmp/dl" && roam_apt_get download "$KPKG=$KVERSION" >&2) ||
        die "apt-get download $KPKG=$KVERSION failed"
    dpkg -x "$KDIR.tmp"/dl/*.deb "$KDIR.tmp/root" || die "dpkg -x failed"
    rm -rf "$KDIR.tmp/dl"
    touch "$KDIR.tmp/.complete"
    mv "$KDIR.tmp" "$KDIR"
fi
KREL="$(ls "$KDIR/root/lib/modules" | head -n1)"
VMLINUZ="$KDIR/root/boot/vmlinuz-$KREL"
[ -f "$VMLINUZ" ] || die "no vmlinuz in $KDIR"
MODDIR="$KDIR/root/lib/modules/$KREL"

# ---- 2. the static agent ------------------------------------------------------
AGENT_TARGET="$ROAM_CACHE/agent-target"
AGENT_BIN="$AGENT_TARGET/x86_64-unknown-linux-gnu/release/roam-agent"
# Skip cargo (a second or more) when no input of the agent is newer than it.
agent_stale() {
    [ -x "$AGENT_BIN" ] || return 0
    [ -n "$(find "$REPO_DIR/crates/agent" "$REPO_DIR/Cargo.toml" "$REPO_DIR/Cargo.lock" \
        -newer "$AGENT_BIN" -print -quit 2>/dev/null)" ]
}
if agent_stale; then
    command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"
    command -v cargo >/dev/null || die "cargo not found (needed to build roam-agent)"
    say "building static roam-agent (target dir $AGENT_TARGET)"
    (
        cd "$REPO_DIR"
        # The caller's target dir and flags (e.g. from `cargo test`) must not
        # leak into this build, nor ours into theirs.
        unset CARGO_TARGET_DIR CARGO_BUILD_TARGET_DIR CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS
        RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
            -p roam-agent --bin roam-agent --no-default-features \
            --target x86_64-unknown-linux-gnu --target-dir "$AGENT_TARGET"
    ) >&2 || die "cargo build of roam-agent failed"
    [ -x "$AGENT_BIN" ] && touch "$AGENT_BIN"
fi
[ -x "$AGENT_BIN" ] || die "no agent binary at $AGENT_BIN"
file_is_static "$AGENT_BIN" || die "$AGENT_BIN is not static"
AGENT_HASH="$(sha256sum "$AGENT_BIN" | cut -c1-64)"

QEMU_VERSION="unknown"
if command -v qemu-system-x86_64 >/dev/null; then
    QEMU_VERSION="$(qemu-system-x86_64 --version | awk 'NR == 1 { print $4 }')"
fi

KEY="$(
    {
        echo "$KPKG $KVERSION $KREL $QEMU_VERSION $AGENT_HASH $GUEST_MODULES $GUEST_CMDLINE"
        sha256sum "$BUSYBOX" "$SCRIPT_DIR/guest-init.sh" "$SCRIPT_DIR/guest-image.sh" | cut -c1-64
    } | sha256sum | cut -c1-16
)"
GUEST_ROOT="$ROAM_CACHE/guest"
OUT="$GUEST_ROOT/$KREL-$KEY"
mkdir -p "$GUEST_ROOT"

publish() {
    local cur
    cur="$(readlink "$GUEST_ROOT/current" 2>/dev/null || true)"
    if [ "$cur" != "$(basename "$OUT")" ]; then
        ln -sfn "$(basename "$OUT")" "$GUEST_ROOT/.current.tmp"
        mv -T "$GUEST_ROOT/.current.tmp" "$GUEST_ROOT/current"
        say "guest: published $OUT"
    fi
    # Keep the three newest builds (a VM may still run on an older one).
    local d
    for d in $(ls -1dt "$GUEST_ROOT"/*-*/ 2>/dev/null | tail -n +4); do
        [ "$(basename "$d")" = "$(basename "$OUT")" ] || rm -rf "$d"
    done
}

if [ "$force" = 0 ] && [ -e "$OUT/.complete" ]; then
    say "guest: up to date ($KREL, agent ${AGENT_HASH:0:12}, QEMU $QEMU_VERSION)"
    publish
    exit 0
fi

# ---- 3. the initramfs ---------------------------------------------------------
say "guest: building initramfs for $KREL"
WORK="$(mktemp -d "$GUEST_ROOT/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
IR="$WORK/root"
mkdir -p "$IR"/{bin,sbin,etc,proc,sys,dev,run,tmp,data,lib/modules,usr/bin,usr/sbin}

# Module name -> file. Names compare with '-' and '_' folded.
declare -A MODFILE=()
while IFS= read -r f; do
    n="$(basename "$f")"
    n="${n%%.ko*}"
    MODFILE["${n//-/_}"]="$f"
done < <(find "$MODDIR/kernel" -name '*.ko*')
declare -A BUILTIN=()
if [ -f "$MODDIR/modules.builtin" ]; then
    while IFS= read -r f; do
        n="$(basename "$f")"
        n="${n%%.ko*}"
        BUILTIN["${n//-/_}"]=1
    done <"$MODDIR/modules.builtin"
fi

# Depth-first: dependencies before dependants (modinfo `depends=` of the file).
declare -A SEEN=()
ORDER=()
add_module() {
    local m="${1//-/_}" d deps
    [ -n "${SEEN[$m]:-}" ] && return 0
    SEEN[$m]=1
    if [ -n "${BUILTIN[$m]:-}" ]; then
        return 0
    fi
    [ -n "${MODFILE[$m]:-}" ] || die "module $m is neither built in nor in $MODDIR"
    deps="$(modinfo -F depends "${MODFILE[$m]}" 2>/dev/null || true)"
    for d in ${deps//,/ }; do add_module "$d"; done
    ORDER+=("$m")
}
for m in $GUEST_MODULES; do add_module "$m"; done

: >"$IR/etc/roam-modules"
for m in "${ORDER[@]}"; do
    src="${MODFILE[$m]}"
    dst="$IR/lib/modules/$m.ko"
    case "$src" in
    *.ko.xz) xz -dc "$src" >"$dst" ;;
    *.ko.zst) zstd -qdc "$src" >"$dst" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" ;;
    *.ko) cp "$src" "$dst" ;;
    *) die "unexpected module file $src" ;;
    esac
    echo "$m.ko" >>"$IR/etc/roam-modules"
done

cp "$BUSYBOX" "$IR/bin/busybox"
file_is_static "$IR/bin/busybox" || die "$BUSYBOX is not static (need busybox-static)"
ln -s busybox "$IR/bin/sh"
cp "$SCRIPT_DIR/guest-init.sh" "$IR/init"
chmod 0755 "$IR/init"
cp "$AGENT_BIN" "$IR/bin/roam-agent"
strip -s "$IR/bin/roam-agent" 2>/dev/null || true

mkdir -p "$WORK/out"
(cd "$IR" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) |
    gzip -6 >"$WORK/out/initramfs.img"
cp "$VMLINUZ" "$WORK/out/vmlinuz"
json_list() { local s="" x; for x in "$@"; do s="$s${s:+, }\"$x\""; done; printf '[%s]' "$s"; }
cat >"$WORK/out/guest.json" <<JSON
{
  "format": 1,
  "kernel_release": "$KREL",
  "kernel_package": "$KPKG",
  "kernel_package_version": "$KVERSION",
  "qemu_version": "$QEMU_VERSION",
  "agent_sha256": "$AGENT_HASH",
  "modules": $(json_list "${ORDER[@]}"),
  "cmdline": "$GUEST_CMDLINE",
  "ready_marker": "ROAM-GUEST-READY",
  "agent_port": "org.roam.agent.0",
  "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}
JSON
touch "$WORK/out/.complete"
rm -rf "$OUT"
mv "$WORK/out" "$OUT"
say "guest: initramfs $(du -h "$OUT/initramfs.img" | cut -f1), modules: ${ORDER[*]}"
publish
