#!/usr/bin/env bash
# Builds the test node's pause image: pause.c as a static musl binary, packed by
# images/ocibuild into OUT/pause.tar (an oci-archive) named REF.
#
#   e2e/k8s/pause/build.sh OUT ckpt.local/pause:1
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT REF}
ref=${2:?usage: build.sh OUT REF}
cc=$(uname -m)-linux-musl-gcc
command -v "$cc" >/dev/null || { echo "$cc is missing (Debian: apt-get install musl-tools)" >&2; exit 1; }
mkdir -p "$out"
"$cc" -static -Os -s -o "$out/pause" "$here/pause.c"
(cd "$here/../../../images/ocibuild" && go build -trimpath -o "$out/ocibuild" .)
# 65535 is the pause image's customary user; it needs no privileges.
"$out/ocibuild" -binary "$out/pause" -path /pause -ref "$ref" -user 65535:65535 -epoch 0 \
  -arch "$(go env GOARCH)" -archive "$out/pause.tar" >/dev/null
