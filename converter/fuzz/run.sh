#!/usr/bin/env bash
# Runs every fuzz target for a bounded time and fails on anything it finds.
#   CKPT_FUZZ_SECONDS   seconds per target (default 10: 14 targets in about 3 minutes
#                       on 2 cores, which fits the test command's budget; raise it for
#                       a deeper run, e.g. 600 before a release)
#   CKPT_CACHE          cache root (default ~/.cache/ckpt): cargo-fuzz is installed into
#                       cargo-fuzz-<version>/, targets build in fuzz-target/, and each
#                       target's working corpus grows in fuzz-corpus/<target> across runs
#                       (seeded from the checked-in corpus/, which a run never changes)
# Prints the executions of each target. A crash, hang (-timeout), out-of-memory or
# oversized allocation (-malloc_limit_mb) is left in fuzz-artifacts/ and fails the run,
# with how to reproduce it; its input then goes into regressions/<raw target>/ (for a
# structure-aware target, the bytes it rendered: CKPT_FUZZ_RENDER=DIR), where the
# stable test replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${CKPT_FUZZ_SECONDS:-10}
CACHE=${CKPT_CACHE:-$HOME/.cache/ckpt}
VERSION=0.13.1
ROOT="$CACHE/cargo-fuzz-$VERSION"
if [ ! -x "$ROOT/bin/cargo-fuzz" ]; then
  echo "installing cargo-fuzz $VERSION into $ROOT (first run only)"
  tmp="$ROOT.tmp-$$"
  rm -rf "$tmp"
  CARGO_TARGET_DIR="$CACHE/cargo-fuzz-build" cargo install cargo-fuzz --version "$VERSION" --locked --root "$tmp" --quiet
  rm -rf "$ROOT"
  mv "$tmp" "$ROOT"
fi
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
export PATH="$ROOT/bin:$PATH"
export CARGO_TARGET_DIR="${CKPT_FUZZ_TARGET_DIR:-$CACHE/fuzz-target}"
# No sanitizer: the targets look for panics, hangs and allocations, which need none,
# and the build and runs are about twice as fast.
cargo +nightly fuzz build -s none
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
ART="$CACHE/fuzz-artifacts"
mkdir -p "$ART"
failed=()
for t in $(cargo +nightly fuzz list); do
  work="$CACHE/fuzz-corpus/$t"
  mkdir -p "$work"
  seeds=()
  [ -d "fuzz/corpus/$t" ] && seeds+=("fuzz/corpus/$t")
  [ -d "fuzz/regressions/$t" ] && seeds+=("fuzz/regressions/$t")
  log="$CACHE/fuzz-$t.log"
  # The binary cargo fuzz built, run directly (cargo fuzz run would rebuild it if
  # the sources changed meanwhile).
  if "$CARGO_TARGET_DIR/$triple/release/$t" "$work" "${seeds[@]}" \
    -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=256 \
    -max_len=65536 -print_final_stats=1 -artifact_prefix="$ART/$t-" >"$log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n 1)
    printf '  %-20s %12s executions in %s s\n' "$t" "${runs:-?}" "$SECS"
  else
    echo "  $t: FOUND A BUG (log: $log)"
    grep -E 'panicked|ERROR: libFuzzer|Test unit written' "$log" | head -n 5 | sed 's/^/    /'
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "error: fuzz targets found bugs: ${failed[*]}" >&2
  echo "reproduce: $CARGO_TARGET_DIR/$triple/release/TARGET $ART/TARGET-crash-… (or cargo +nightly fuzz run -s none TARGET FILE in converter/)" >&2
  exit 1
fi
