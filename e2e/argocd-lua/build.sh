#!/usr/bin/env bash
# Build argocd-health (Argo CD's Lua engine, gopher-lua, running a health script as
# Argo CD does; see main.go) from the pinned Go module here and cache it outside the
# work tree. Prints the binary's path as the LAST line of stdout:
#
#   BIN=$(e2e/argocd-lua/build.sh | tail -1)
#
# Cache: ${CKPT_CACHE:-$HOME/.cache/ckpt}/argocd-lua/<key>/argocd-health, where <key>
# hashes go.mod, go.sum, main.go, this script and the Go version. Built into a temp
# dir and renamed, so an interrupted build never looks done. Needs Go and the Go
# module proxy (a few seconds; two small modules).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${CKPT_CACHE:-$HOME/.cache/ckpt}/argocd-lua
log() { echo "argocd-lua/build.sh: $*" >&2; }
command -v go >/dev/null || { log "go not found in PATH (install Go 1.26 or newer)"; exit 1; }

key=$( (go version; for f in go.mod go.sum main.go build.sh; do echo "== $f"; cat "$here/$f"; done) | sha256sum | cut -c1-16)
bin=$cache_root/$key/argocd-health
if [[ -x $bin ]]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$cache_root"
exec 9>"$cache_root/.$key.lock"
flock 9
if [[ -x $bin ]]; then
  echo "$bin"
  exit 0
fi
tmp=$(mktemp -d "$cache_root/.tmp-$key.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
log "building argocd-health"
(cd "$here" && CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o "$tmp/argocd-health" .)
mv -T "$tmp" "$cache_root/$key"
trap - EXIT
echo "$bin"
