# shellcheck shell=bash
# Shared by scripts/setup.sh and scripts/guest-image.sh (sourced, not run).
#
# apt is always driven through a PRIVATE sources directory so that the
# backports suite can be used without editing anything under /etc:
#   $ROAM_CACHE/apt/sources.list.d/
#       debian.sources     verbatim copy of the machine's own file
#       backports.sources  the same stanzas (minus security) with
#                          `Suites: <codename>-backports`
# and every apt call gets `-o Dir::Etc::SourceParts=… -o Dir::Etc::SourceList=/dev/null`.
# The machine's own suites are kept in the private directory too, because
# `apt-get update` drops the lists of every suite it was not told about.

ROAM_CACHE="${ROAM_CACHE:-/var/cache/roam}"
ROAM_APT_DIR="$ROAM_CACHE/apt/sources.list.d"
ROAM_MACHINE_SOURCES="${ROAM_MACHINE_SOURCES:-/etc/apt/sources.list.d/debian.sources}"

say() { printf 'roam-setup: %s\n' "$*" >&2; }
die() { printf 'roam-setup: ERROR: %s\n' "$*" >&2; exit 1; }

# The Debian codename of this machine (bookworm on the test bed).
roam_codename() {
    local c=""
    if [ -r /etc/os-release ]; then
        c="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")"
    fi
    [ -n "$c" ] || die "cannot tell the Debian codename from /etc/os-release"
    printf '%s' "$c"
}

# Writes the private sources directory (cheap; rewritten only if it changed).
roam_apt_prepare() {
    [ -r "$ROAM_MACHINE_SOURCES" ] ||
        die "$ROAM_MACHINE_SOURCES is missing: cannot derive the backports source"
    local codename tmp
    codename="$(roam_codename)"
    mkdir -p "$ROAM_APT_DIR"
    tmp="$(mktemp "$ROAM_APT_DIR/.backports.XXXXXX")"
    # Keep every stanza whose suites name the main codename (not -security),
    # and point it at <codename>-backports.
    awk -v bp="${codename}-backports" -v cn="$codename" '
        function flush() {
            if (n > 0 && keep) { for (i = 1; i <= n; i++) print lines[i]; print "" }
            n = 0; keep = 0
        }
        /^[[:space:]]*$/ { flush(); next }
        {
            line = $0
            if (line ~ /^Suites:/) {
                if (line ~ ("(^|[[:space:]])" cn "([[:space:]]|$)")) keep = 1
                line = "Suites: " bp
            }
            lines[++n] = line
        }
        END { flush() }
    ' "$ROAM_MACHINE_SOURCES" >"$tmp"
    [ -s "$tmp" ] || { rm -f "$tmp"; die "no '$codename' stanza in $ROAM_MACHINE_SOURCES"; }
    if ! cmp -s "$tmp" "$ROAM_APT_DIR/backports.sources" 2>/dev/null; then
        mv -f "$tmp" "$ROAM_APT_DIR/backports.sources"
    else
        rm -f "$tmp"
    fi
    if ! cmp -s "$ROAM_MACHINE_SOURCES" "$ROAM_APT_DIR/debian.sources" 2>/dev/null; then
        cp -f "$ROAM_MACHINE_SOURCES" "$ROAM_APT_DIR/debian.sources"
    fi
}

# apt-get / apt-cache with the private sources.
roam_apt_opts() {
    printf '%s\n' -o "Dir::Etc::SourceParts=$ROAM_APT_DIR" -o Dir::Etc::SourceList=/dev/null \
        -o APT::Sandbox::User=root
}
roam_apt_get() {
    local opts
    mapfile -t opts < <(roam_apt_opts)
    DEBIAN_FRONTEND=noninteractive apt-get -q "${opts[@]}" "$@"
}
roam_apt_cache() {
    local opts
    mapfile -t opts < <(roam_apt_opts)
    apt-cache "${opts[@]}" "$@"
}

ROAM_APT_UPDATED=0
# Runs `apt-get update` at most once per script run.
roam_apt_update() {
    [ "$ROAM_APT_UPDATED" = 1 ] && return 0
    say "apt-get update (private sources: $ROAM_APT_DIR)"
    roam_apt_get update >&2 || die "apt-get update failed"
    ROAM_APT_UPDATED=1
}
