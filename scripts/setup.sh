#!/usr/bin/env bash
# roam: set up a fresh machine (idempotent; about a second when nothing is missing).
#
#   bash scripts/setup.sh                 # packages + guest image
#   bash scripts/setup.sh --packages-only # only the apt packages
#   bash scripts/setup.sh --guest-only    # only the guest kernel/initramfs
#   bash scripts/setup.sh --force-guest   # rebuild the guest image even if cached
#   bash scripts/setup.sh PKG...          # also install these apt packages
#   ROAM_EXTRA_PKGS="a b" bash scripts/setup.sh   # same, from the environment
#
# Installs, only when missing: QEMU 10 (qemu-system-x86 from <codename>-backports,
# through a private apt sources directory, /etc untouched) and the tools the
# tests use. `apt-get update` runs only when something has to be installed.
# Everything it keeps lives under ${ROAM_CACHE:-/var/cache/roam}.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/guest-common.sh
. "$SCRIPT_DIR/guest-common.sh"

# Packages from the main suite. Each is installed only if dpkg says it is absent.
BASE_PKGS=(qemu-utils busybox-static libnbd-bin e2fsprogs iproute2 iputils-ping kmod cpio xz-utils python3 python3-cryptography bsdutils)
# Packages that must come from backports, with the least version accepted.
QEMU_PKGS=(qemu-system-x86 qemu-utils)
QEMU_MIN_VERSION="1:10.0"

do_packages=1
do_guest=1
force_guest=0
extra=()
for arg in "$@"; do
    case "$arg" in
    --packages-only) do_guest=0 ;;
    --guest-only) do_packages=0 ;;
    --force-guest) force_guest=1 ;;
    -h | --help)
        sed -n '2,14p' "$0"
        exit 0
        ;;
    -*) die "unknown option $arg (see --help)" ;;
    *) extra+=("$arg") ;;
    esac
done
# shellcheck disable=SC2206 # word splitting of the list is the point
extra+=(${ROAM_EXTRA_PKGS:-})

mkdir -p "$ROAM_CACHE" || die "cannot create $ROAM_CACHE"
# One set-up at a time: a second caller waits, then finds everything present.
exec 9>"$ROAM_CACHE/setup.lock"
if ! flock -n 9; then
    say "another setup.sh is running; waiting for it"
    flock -w 900 9 || die "timed out waiting for $ROAM_CACHE/setup.lock"
fi

is_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

qemu_ok() {
    is_installed qemu-system-x86 || return 1
    local v
    v="$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null)" || return 1
    dpkg --compare-versions "$v" ge "$QEMU_MIN_VERSION" || return 1
    v="$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null)" || return 1
    dpkg --compare-versions "$v" ge "$QEMU_MIN_VERSION"
}

install_packages() {
    local missing=() p
    for p in "${BASE_PKGS[@]}" "${extra[@]}"; do
        is_installed "$p" || missing+=("$p")
    done
    local need_qemu=0
    qemu_ok || need_qemu=1
    if [ "$need_qemu" = 0 ] && [ "${#missing[@]}" = 0 ]; then
        say "packages: all present (QEMU $(dpkg-query -W -f='${Version}' qemu-system-x86))"
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "packages missing (${missing[*]} qemu=$need_qemu) and not root"
    roam_apt_prepare
    roam_apt_update
    if [ "$need_qemu" = 1 ]; then
        local codename
        codename="$(roam_codename)"
        say "installing ${QEMU_PKGS[*]} from $codename-backports"
        roam_apt_get install -y --no-install-recommends -t "$codename-backports" "${QEMU_PKGS[@]}" >&2 ||
            die "could not install QEMU from $codename-backports"
        qemu_ok || die "QEMU >= $QEMU_MIN_VERSION still not installed after apt-get"
    fi
    # qemu-utils may just have come in with QEMU.
    local still=()
    for p in "${missing[@]}"; do is_installed "$p" || still+=("$p"); done
    if [ "${#still[@]}" -gt 0 ]; then
        say "installing ${still[*]}"
        roam_apt_get install -y --no-install-recommends "${still[@]}" >&2 ||
            die "could not install: ${still[*]}"
    fi
    for p in "${missing[@]}"; do is_installed "$p" || die "$p is still not installed"; done
    say "packages: installed ${missing[*]}$([ "$need_qemu" = 1 ] && echo " qemu-system-x86")"
}

if [ "$do_packages" = 1 ]; then
    install_packages
fi
if [ "$do_guest" = 1 ]; then
    guest_args=()
    [ "$force_guest" = 1 ] && guest_args+=(--force)
    ROAM_SETUP_LOCKED=1 bash "$SCRIPT_DIR/guest-image.sh" "${guest_args[@]}" ||
        die "guest image build failed"
fi
say "done"
