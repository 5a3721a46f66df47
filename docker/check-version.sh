#!/usr/bin/env bash
# The image puts Petrel at /usr/local/bin/envoy. Lay the built binary out the same way and
# check that `envoy --version` answers in Envoy's form, `<path>  version:
# <40-hex commit>/<x.y.z>/<status>/<build type>/<TLS library>`: tools that read an Envoy
# version (from `--version` or `/server_info`, which carries the same string) split it on `/`.
# Usage: docker/check-version.sh [path-to-petrel]   (default: target/debug/petrel)
set -euo pipefail
bin="${1:-${CARGO_TARGET_DIR:-target}/debug/petrel}"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/local/bin"
cp "$bin" "$root/usr/local/bin/envoy"
out="$("$root/usr/local/bin/envoy" --version)"
line="$(printf '%s\n' "$out" | grep -v '^$')"
re='^.*/usr/local/bin/envoy  version: [0-9a-f]{40}/[0-9]+\.[0-9]+\.[0-9]+(-[A-Za-z0-9.]+)?/[A-Za-z]+/(RELEASE|DEBUG)/[A-Za-z]+$'
if [[ "$line" =~ $re ]]; then
  echo "docker/check-version.sh: ok: $line"
else
  echo "docker/check-version.sh: --version is not in Envoy's form: $line" >&2
  exit 1
fi
