#!/usr/bin/env bash
# Builds the converter and operator images without a daemon or a base image:
# each is one static musl binary in one layer, written as an OCI image layout
# directory and as an oci-archive tarball.
#
#   images/build.sh                 # into $OUT (default <cargo target dir>/images)
#   OUT=/tmp/img images/build.sh
#
# Prints one line per image on stdout: NAME REFERENCE DIGEST ARCHIVE LAYOUT.
# The same commit (and the same Rust and Go toolchains) gives byte-identical
# outputs: timestamps come from SOURCE_DATE_EPOCH (default: the commit time),
# tar entries are sorted with fixed owners and modes, and no build path is
# recorded (the binaries are built with --remap-path-prefix, see below).
#
# Environment: OUT, IMAGE_REGISTRY (ghcr.io/ckpt-dev), IMAGE_TAG (the crate
# version), IMAGE_SOURCE (the org.opencontainers.image.source label),
# SOURCE_DATE_EPOCH, CARGO_TARGET_DIR, CKPT_IMAGES_NO_CARGO=1 (use the binaries
# already built; for tests that build twice), CKPT_IMAGES_TEST=1 (also the test
# image ckpt-convert-failpoints, below).
#
# The test image is for the node tests only and never published: the converter
# built with the test-only `failpoints` feature (converter/src/failpoint.rs) at
# the same path, its config setting CKPT_CONVERT_PAUSE_AT=pieces:1 and
# CKPT_CONVERT_PAUSE_FILE=/tmp/ckpt-pause, so that a conversion the operator
# starts waits, staged and part-written, for as long as a test needs (a deadline,
# a deletion) without depending on how fast the node is.
# Needs: Rust with the <arch>-unknown-linux-musl target, musl-gcc (Debian:
# musl-tools), Go, git.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
log() { echo "images/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

arch=$(uname -m)
case $arch in
  x86_64) goarch=amd64 ;;
  aarch64) goarch=arm64 ;;
  *) die "unsupported machine $arch" ;;
esac
triple=$arch-unknown-linux-musl
target_dir=${CARGO_TARGET_DIR:-$repo/target}
case $target_dir in /*) ;; *) target_dir=$repo/$target_dir ;; esac
out=${OUT:-$target_dir/images}
registry=${IMAGE_REGISTRY:-ghcr.io/ckpt-dev}
source_url=${IMAGE_SOURCE:-https://github.com/ckpt-dev/ckpt}

command -v go >/dev/null || die "go is required (Go 1.26 or newer)"
command -v git >/dev/null || die "git is required"

if [[ ${CKPT_IMAGES_NO_CARGO:-0} != 1 ]]; then
  command -v cargo >/dev/null || die "cargo is required (https://rustup.rs)"
  rustup target list --installed 2>/dev/null | grep -qx "$triple" ||
    die "the Rust target $triple is missing: rustup target add $triple"
  command -v "$arch-linux-musl-gcc" >/dev/null ||
    die "$arch-linux-musl-gcc is missing (Debian: apt-get install musl-tools)"
  # The same build as the Dockerfiles (run-tests.sh's images step runs this script);
  # the workspace, cargo home and rustup paths are remapped so that the
  # binaries do not depend on where the checkout lives.
  cargo_build() {
    RUSTFLAGS="${RUSTFLAGS:-} --remap-path-prefix=$repo=/src --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo --remap-path-prefix=${RUSTUP_HOME:-$HOME/.rustup}=/rustup" \
      cargo build --release --locked --target "$triple" "$@" >&2
  }
  if [[ ${CKPT_IMAGES_TEST:-0} == 1 ]]; then
    # First, and set aside: the plain build below puts the product binary back.
    cargo_build -p ckpt-convert --features ckpt-convert/failpoints
    cp "$target_dir/$triple/release/ckpt-convert" "$target_dir/$triple/release/ckpt-convert-failpoints"
  fi
  cargo_build -p ckpt-convert -p ckpt-operator
fi

epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
revision=$(git rev-parse HEAD)
# A build from a modified checkout must not claim to be the commit.
if ! git diff --quiet HEAD -- 2>/dev/null; then
  revision+="-dirty"
fi

ocibuild=$(mktemp -d)/ocibuild
trap 'rm -rf "$(dirname "$ocibuild")"' EXIT
(cd images/ocibuild && go build -trimpath -o "$ocibuild" .)
mkdir -p "$out"

# build_image NAME PROGRAM TITLE [ocibuild flags]: the image NAME holding the
# binary NAME at /PROGRAM.
build_image() {
  local name=$1 program=$2 title=$3
  shift 3
  local bin=$target_dir/$triple/release/$name
  [[ -x $bin ]] || die "$bin is missing (run without CKPT_IMAGES_NO_CARGO)"
  local version
  version=$("$bin" --version | awk '{print $2}')
  [[ -n $version ]] || die "$bin --version printed no version"
  local tag=${IMAGE_TAG:-$version}
  local digest
  digest=$("$ocibuild" -binary "$bin" -path "/$program" -ref "$registry/$name:$tag" \
    -arch "$goarch" -epoch "$epoch" -user 65532:65532 \
    -label "org.opencontainers.image.title=$name" \
    -label "org.opencontainers.image.description=$title" \
    -label "org.opencontainers.image.source=$source_url" \
    -label "org.opencontainers.image.revision=$revision" \
    -label "org.opencontainers.image.version=$version" \
    -label "org.opencontainers.image.licenses=Apache-2.0" \
    -label "org.opencontainers.image.created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)" \
    -layout "$out/$name" -archive "$out/$name.tar" "$@")
  echo "$name $registry/$name:$tag $digest $out/$name.tar $out/$name"
}

build_image ckpt-convert ckpt-convert "Converts model checkpoints between Hugging Face, Megatron-Core and LoRA layouts"
build_image ckpt-operator ckpt-operator "The CheckpointConversion operator" -expose 8080/tcp
if [[ ${CKPT_IMAGES_TEST:-0} == 1 ]]; then
  build_image ckpt-convert-failpoints ckpt-convert "Test only: the converter with failpoints, paused at its first written piece" \
    -env CKPT_CONVERT_PAUSE_AT=pieces:1 -env CKPT_CONVERT_PAUSE_FILE=/tmp/ckpt-pause
fi
