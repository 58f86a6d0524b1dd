#!/usr/bin/env bash
# Runs every test of the project on a fresh machine, installing what it needs and
# caching it outside the work tree (keyed by what determines it):
#   - Rust build products in $CARGO_TARGET_DIR (default ~/.cache/ckpt/target);
#   - the pinned Python reference stack (torch, transformers, peft, megatron-core)
#     in ~/.cache/ckpt/venv-<hash of e2e/requirements.txt>;
#   - the Kubernetes control plane and the kubelet built from Go modules in
#     ~/.cache/ckpt/k8s-bin/<hash>;
#   - Megatron-Bridge 0.3.1 in ~/.cache/ckpt/bridge-venv-<hash of e2e/bridge/requirements.txt>
#     and the references it writes in ~/.cache/ckpt/bridge-refs-<hash> (CKPT_BRIDGE_REFS);
#   - Argo CD's Lua engine (gopher-lua) for the health check in ~/.cache/ckpt/argocd-lua/<hash>;
#   - cargo-fuzz in ~/.cache/ckpt/cargo-fuzz-<version>, the fuzz targets' build and their
#     growing working corpora (converter/fuzz/run.sh; CKPT_FUZZ_SECONDS per target,
#     default 10: about 3 minutes warm for the 14 targets on 2 cores, which keeps a warm
#     run of this script near 15 minutes; raise it for a deeper run).
# Debian packages are installed with apt-get (as root): containerd, runc and CNI plugins
# for the test node, skopeo and umoci for the image checks, slurm-wlm and munge for the
# Slurm executor's tests, which start a single-node Slurm of their own
# (ckpt_testcluster::Slurm).
# A missing prerequisite fails the run with a message; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")"
REPO=$PWD
CACHE="${CKPT_CACHE:-$HOME/.cache/ckpt}"
mkdir -p "$CACHE"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
export CKPT_CACHE="$CACHE"
# Cargo keeps a workspace's build when the workspace moves, with the old checkout's
# path compiled into it (tests find their files through env!("CARGO_MANIFEST_DIR")).
# When the target directory was last used from another checkout, our own crates
# are rebuilt; the dependencies' builds stay.
checkout_mark="$CARGO_TARGET_DIR/.ckpt-checkout"
if [ -d "$CARGO_TARGET_DIR" ] && [ "$(cat "$checkout_mark" 2>/dev/null)" != "$REPO" ]; then
  echo "== $CARGO_TARGET_DIR was last used from $(cat "$checkout_mark" 2>/dev/null || echo 'an unknown checkout'): rebuilding this workspace's crates"
  for pkg in $(cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json, sys; print(" ".join(p["name"] for p in json.load(sys.stdin)["packages"]))'); do
    cargo clean --quiet -p "$pkg"
    cargo clean --quiet -p "$pkg" --target "$(uname -m)-unknown-linux-musl"
  done
fi
mkdir -p "$CARGO_TARGET_DIR"
echo "$REPO" > "$checkout_mark"
START=$(date +%s)
SUMMARY=()

step() {
  local name=$1
  shift
  local t0
  t0=$(date +%s)
  echo "==> $name"
  "$@"
  SUMMARY+=("$(printf '%-44s %5ss' "$name" $(($(date +%s) - t0)))")
}

need() {
  command -v "$1" >/dev/null 2>&1 || {
    echo "error: $1 is required: $2" >&2
    exit 1
  }
}
need cargo "install Rust with rustup (https://rustup.rs)"
need python3 "install Python 3.11 with pip and venv"
need go "install Go 1.26 or newer"

rust_checks() {
  cargo fmt --all -- --check
  cargo clippy --workspace --all-targets --features ckpt-convert/failpoints -- -D warnings
}

control_plane() {
  # Built once from the pinned Go modules (about 12 minutes on 2 cores), then cached.
  local out
  out=$(e2e/k8s/build.sh)
  CKPT_K8S_BIN=$(printf '%s\n' "$out" | tail -n 1)
  export CKPT_K8S_BIN
  "$CKPT_K8S_BIN/kube-apiserver" --version
  # A few seconds, then cached.
  CKPT_ARGOCD_HEALTH_BIN=$(e2e/argocd-lua/build.sh | tail -n 1)
  export CKPT_ARGOCD_HEALTH_BIN
}

slurm_packages() {
  # The tests start slurmctld, slurmd and munged themselves, with a configuration,
  # state, ports and munge key of their own; only the programs come from here.
  if [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ] && command -v sbatch >/dev/null 2>&1; then
    return
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurm-wlm munge >/dev/null || { apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null; }
  else
    echo "error: Slurm is required for the Slurm executor's tests (Debian, as root: apt-get install slurm-wlm munge)" >&2
    exit 1
  fi
  slurmd -V
}

rust_tests() {
  cargo build --workspace --release
  export CKPT_CONVERT_BIN="$CARGO_TARGET_DIR/release/ckpt-convert"
  local failed=0
  cargo test --workspace --exclude ckpt-operator --features ckpt-convert/failpoints \
    --no-fail-fast || failed=1
  # The operator's end-to-end suite runs its Jobs' pods on the real node (kubelet,
  # containerd, runc, the converter image), the real-node-only test (ignored by a
  # plain `cargo test`) included; the tests named `…_on_the_stand_in` make the node
  # do what only the stand-in can (operator/tests/cluster/main.rs says what) and run
  # on it after.
  CKPT_TEST_NODE=real cargo test -p ckpt-operator --features ckpt-convert/failpoints \
    --no-fail-fast -- --include-ignored --skip on_the_stand_in || failed=1
  # On the stand-in the node runs the converter from the host: the test image's
  # static build with failpoints (the images step made it), for the faults that
  # pause a part mid-write.
  CKPT_CONVERT_BIN="$CARGO_TARGET_DIR/$(uname -m)-unknown-linux-musl/release/ckpt-convert-failpoints" \
    cargo test -p ckpt-operator --features ckpt-convert/failpoints --test cluster \
    -- on_the_stand_in || failed=1
  return $failed
}

python_env() {
  local key
  key=$( (python3 --version; cat e2e/requirements.txt) | sha256sum | cut -c1-16)
  VENV="$CACHE/venv-$key"
  if [ ! -f "$VENV/.complete" ]; then
    echo "installing the Python reference stack into $VENV (first run only)"
    # Built beside and renamed, so an interrupted install is never taken for done;
    # everything runs through `python -m`, which does not depend on the venv's path.
    local tmp="$VENV.tmp-$$"
    rm -rf "$tmp" "$VENV"
    python3 -m venv "$tmp"
    "$tmp/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r e2e/requirements.txt
    "$tmp/bin/python" -c "import torch, transformers, peft, safetensors, megatron.core, pytest"
    touch "$tmp/.complete"
    mv "$tmp" "$VENV"
  fi
}

bridge_env() {
  # The real Megatron-Bridge 0.3.1 (transformers 4.x) in a second venv, same pattern as
  # python_env; about 2 minutes to install on 2 cores, then cached.
  local key
  key=$( (python3 --version; cat e2e/bridge/requirements.txt) | sha256sum | cut -c1-16)
  BRIDGE_VENV="$CACHE/bridge-venv-$key"
  if [ ! -f "$BRIDGE_VENV/.complete" ]; then
    echo "installing Megatron-Bridge 0.3.1 into $BRIDGE_VENV (first run only)"
    local tmp="$BRIDGE_VENV.tmp-$$" t0
    t0=$(date +%s)
    rm -rf "$tmp" "$BRIDGE_VENV"
    python3 -m venv "$tmp"
    "$tmp/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r e2e/bridge/requirements.txt
    "$tmp/bin/python" -c "import torch, transformers, safetensors, megatron.core, yaml, omegaconf, modelopt"
    touch "$tmp/.complete"
    mv "$tmp" "$BRIDGE_VENV"
    echo "Megatron-Bridge venv installed in $(($(date +%s) - t0)) s"
  fi
}

bridge_refs() {
  # What Megatron-Bridge itself writes (imports, exports, LoRA checkpoints, merges) for tiny
  # Llama, Qwen3, Qwen3-MoE and Nemotron-H models, generated once and cached; the later
  # steps find them through CKPT_BRIDGE_REFS (layout: e2e/bridge/BRIDGE_NOTES.md).
  local out
  out=$(e2e/bridge/refs.sh "$BRIDGE_VENV/bin/python")
  CKPT_BRIDGE_REFS=$(printf '%s\n' "$out" | tail -n 1)
  export CKPT_BRIDGE_REFS
  ls "$CKPT_BRIDGE_REFS"
}

interop_tests() {
  CKPT_CONVERT_BIN="$CARGO_TARGET_DIR/release/ckpt-convert" \
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider e2e/interop
}

fuzz() {
  # Every parser of untrusted bytes under libFuzzer (nightly) for a bounded time; the
  # checked-in corpora and regressions were replayed on stable by the Rust tests.
  converter/fuzz/run.sh
}

demo() {
  "$CARGO_TARGET_DIR/release/ckpt-convert" demo --dir "$(mktemp -d)/demo" >/dev/null
}

debian_packages() {
  # The real test node (containerd, runc, CNI plugins, iproute2), the image
  # checks (skopeo, umoci) and the static builds (musl-tools) come from Debian.
  local missing=() pkg
  for pkg in musl-tools containerd runc containernetworking-plugins skopeo umoci iproute2; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq "${missing[@]}" >/dev/null ||
      { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
  else
    echo "error: missing Debian packages: ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 1
  fi
}

images() {
  # The converter and operator images (images/build.sh), from static musl
  # binaries built as the Dockerfiles build them; checked to be static and to run.
  local triple
  triple="$(uname -m)-unknown-linux-musl"
  rustup target list --installed | grep -qx "$triple" || rustup target add "$triple"
  # With the test image the node tests use (the converter with failpoints).
  CKPT_IMAGES_TEST=1 images/build.sh
  local bin
  for bin in ckpt-convert ckpt-operator ckpt-convert-failpoints; do
    local f="$CARGO_TARGET_DIR/$triple/release/$bin"
    if readelf -l "$f" | grep -q 'program interpreter' || readelf -d "$f" | grep -q NEEDED; then
      echo "error: $f is not statically linked" >&2
      exit 1
    fi
    "$f" --version
  done
}

step "rust: fmt and clippy" rust_checks
step "debian: node and image packages" debian_packages
step "kubernetes: control plane and kubelet; Argo CD's Lua" control_plane
step "python: reference stack" python_env
step "python: Megatron-Bridge reference stack" bridge_env
# The Rust tests compare with these too, so they come first.
step "bridge: Megatron-Bridge 0.3.1 references" bridge_refs
step "images: converter and operator" images
step "slurm: slurm-wlm and munge (Debian packages)" slurm_packages
step "rust: build, unit, integration, control-plane and Slurm tests" rust_tests
step "fuzz: every parser for ${CKPT_FUZZ_SECONDS:-10} s each" fuzz
step "demo" demo
step "interop: torch DCP, megatron-core, transformers" interop_tests

echo
echo "all tests passed in $(($(date +%s) - START)) s"
printf '  %s\n' "${SUMMARY[@]}"
