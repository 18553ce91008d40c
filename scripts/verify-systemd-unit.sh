#!/usr/bin/env bash
# Usage: scripts/verify-systemd-unit.sh BINARY [UNIT]
#
# Checks deploy/systemd/yc-iam-sidecar.service (or UNIT) with `systemd-analyze verify`, with
# ExecStart pointed at BINARY so that the command line is checked against a real executable.
# `systemd-analyze verify` exits 0 on unknown keys and unparsable values and only prints a
# warning, so this script fails on ANY output, not only on a non-zero exit status.
set -euo pipefail

die() { printf 'verify-systemd-unit: %s\n' "$*" >&2; exit 1; }

[[ $# -ge 1 && $# -le 2 ]] || die "usage: $0 BINARY [UNIT]"
command -v systemd-analyze >/dev/null 2>&1 \
    || die "systemd-analyze not found (Debian/Ubuntu: apt-get install systemd)"

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
binary=$(realpath -e -- "$1") || die "binary not found: $1"
[[ -x $binary ]] || die "not executable: $binary"
unit=$(realpath -e -- "${2:-$script_dir/../deploy/systemd/yc-iam-sidecar.service}") \
    || die "unit file not found: ${2:-deploy/systemd/yc-iam-sidecar.service}"
# Characters that systemd (%, $, \, whitespace) or the sed replacement below (|, &) would
# interpret.
[[ $binary != *[[:space:]%\$\\\|\&]* ]] \
    || die "binary path must not contain whitespace or any of % \$ \\ | &: $binary"
grep -q '^ExecStart=/usr/local/bin/yc-iam-sidecar[[:space:]]' -- "$unit" \
    || die "no 'ExecStart=/usr/local/bin/yc-iam-sidecar ...' line to rewrite in $unit"

# Lines known to be printed by `systemd-analyze verify` because of the environment (a container
# without systemd as PID 1) rather than because of the unit. One extended regex per entry, each
# with a comment saying where it was seen; keep them as narrow as possible.
# Measured with systemd 252 (Debian 12) in a container whose PID 1 is not systemd, as root and as
# an unprivileged user: a valid unit printed nothing, so nothing is filtered. Debug-level lines
# (such as "Failed to read $container of PID 1") are kept out by SYSTEMD_LOG_LEVEL=info below
# instead of by a pattern.
noise_patterns=()

tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT
copy=$tmp/$(basename -- "$unit")

sed "s|^ExecStart=/usr/local/bin/yc-iam-sidecar\\([[:space:]]\\)|ExecStart=$binary\\1|" \
    -- "$unit" >"$copy"

status=0
output=$(cd "$tmp" && SYSTEMD_LOG_LEVEL=info SYSTEMD_LOG_COLOR=0 SYSTEMD_PAGER='' \
    systemd-analyze verify --man=no -- "$copy" 2>&1) || status=$?

for pattern in "${noise_patterns[@]}"; do
    output=$(grep -Ev -- "$pattern" <<<"$output" || true)
done

if [[ $status -ne 0 || -n $output ]]; then
    printf 'verify-systemd-unit: FAILED for %s (systemd-analyze exit status %d):\n' \
        "$unit" "$status" >&2
    [[ -z $output ]] || printf '%s\n' "$output" >&2
    exit 1
fi
printf 'verify-systemd-unit: OK: %s (ExecStart=%s)\n' "$unit" "$binary"
