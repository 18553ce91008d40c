#!/usr/bin/env bash
# Runs `cargo deny check` (advisories, bans, licenses, sources) fully offline,
# against the on-disk RustSec advisory snapshot instead of fetching it.
#
#   bash scripts/deny.sh            # snapshot at <repo>/../shared/advisory-db
#   ADVISORY_DB=/path/to/advisory-db bash scripts/deny.sh
#
# The snapshot is a plain copy of the advisory-db repository (crates/, rust/)
# without .git. cargo-deny only opens a database that is a git repository at
# <db-path>/<name>-<hash of url>, so the snapshot is copied to a temporary
# directory under that name, committed there, and a copy of deny.toml with
# `[advisories] db-path` pointing at it is passed with --config.
# Needs cargo-deny on PATH (cargo install --locked cargo-deny --version 0.20.2).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
advisory_db="${ADVISORY_DB:-${repo_root}/../shared/advisory-db}"
policy="${repo_root}/deny.toml"

# Directory name cargo-deny (0.18-0.20) expects for the default database URL
# https://github.com/RustSec/advisory-db: "<last path segment>-<XxHash64 of the
# lower-cased URL, seed 0xca80de71>" (src/advisories/helpers/db.rs, url_to_db_path).
db_dir_name="advisory-db-3157b0e258782691"

die() {
    printf 'deny.sh: %s\n' "$*" >&2
    exit 1
}

command -v cargo-deny >/dev/null 2>&1 ||
    die "cargo-deny not found; install it with: cargo install --locked cargo-deny --version 0.20.2"
command -v git >/dev/null 2>&1 || die "git not found"
[[ -f "${policy}" ]] || die "no deny.toml at ${policy}"
[[ -d "${advisory_db}/crates" ]] ||
    die "no advisory snapshot at ${advisory_db} (expected crates/ and rust/ in it; set ADVISORY_DB)"
grep -q '^\[advisories\]' "${policy}" || die "deny.toml has no [advisories] table"
if grep -q '^[[:space:]]*db-path[[:space:]]*=' "${policy}"; then
    die "deny.toml sets db-path itself; this script supplies it"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/cargo-deny.XXXXXX")"
cleanup() { rm -rf "${work}"; }
trap cleanup EXIT

db_root="${work}/advisory-dbs"
db_repo="${db_root}/${db_dir_name}"
mkdir -p "${db_repo}"
# "/." so that a symlinked snapshot directory is copied by content.
cp -R "${advisory_db}/." "${db_repo}/"
chmod -R u+w "${db_repo}"
rm -rf "${db_repo}/.git"

git -C "${db_repo}" -c init.defaultBranch=main init -q
git -C "${db_repo}" config user.name "deny.sh"
git -C "${db_repo}" config user.email "deny.sh@localhost"
git -C "${db_repo}" config commit.gpgsign false
git -C "${db_repo}" add -A
git -C "${db_repo}" -c core.hooksPath=/dev/null commit -q -m "advisory-db snapshot from ${advisory_db}"

advisory_count="$(find "${db_repo}/crates" "${db_repo}/rust" -name '*.md' | wc -l)"
newest="$(grep -rhoE '^date = "[0-9-]+"' "${db_repo}/crates" "${db_repo}/rust" | sort | tail -n 1 | cut -d'"' -f2 || true)"
printf 'advisory snapshot: %s (%s advisories, newest dated %s)\n' \
    "${advisory_db}" "${advisory_count// /}" "${newest:-unknown}"

# deny.toml plus the offline database location.
config="${work}/deny.toml"
awk -v db_path="${db_root}" '
    { print }
    /^\[advisories\]/ { printf "db-path = \"%s\"\n", db_path }
' "${policy}" >"${config}"

cargo deny --version
passed=0
failed=0
for check in advisories bans licenses sources; do
    printf '\n==> cargo deny check %s\n' "${check}"
    if cargo deny --offline --locked --manifest-path "${repo_root}/Cargo.toml" \
        --config "${config}" check "${check}"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        printf 'cargo-deny: check %s FAILED\n' "${check}"
    fi
done

printf '\ncargo-deny: %d passed, %d failed\n' "${passed}" "${failed}"
[[ "${failed}" -eq 0 ]]
