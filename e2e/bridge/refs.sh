#!/usr/bin/env bash
# Generates the Megatron-Bridge 0.3.1 reference artifacts (make_refs.py, every case) once,
# into $CKPT_CACHE/bridge-refs-<hash> (default ~/.cache/ckpt), keyed by everything that
# determines them: the generator's sources, the pinned requirements and the Python version.
# Prints the directory on its last line.  Usage: e2e/bridge/refs.sh BRIDGE_VENV_PYTHON
#
# The artifacts record absolute paths (run_config.yaml: checkpoint.save,
# pretrained_checkpoint, tokenizer and hf_model_id), so they are generated in place, not
# beside and renamed: a directory without .complete is removed and made again.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:?usage: e2e/bridge/refs.sh BRIDGE_VENV_PYTHON}
CACHE="${CKPT_CACHE:-$HOME/.cache/ckpt}"
mkdir -p "$CACHE"
key=$( (
  "$PY" --version
  for f in e2e/bridge/requirements.txt e2e/bridge/*.py e2e/bridge/upstream/*.py \
    e2e/bridge/nemotron3_nano_30b_a3b_config.json e2e/interop/mcore_cpu.py; do
    printf '%s\n' "$f"
    cat "$f"
  done
) | sha256sum | cut -c1-16)
OUT="$CACHE/bridge-refs-$key"
exec 9>"$OUT.lock"
flock 9
if [ ! -f "$OUT/.complete" ]; then
  echo "generating the Megatron-Bridge references into $OUT (first run only)" >&2
  rm -rf "$OUT"
  t0=$(date +%s)
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$PY" e2e/bridge/make_refs.py all "$OUT" >"$OUT.log" 2>&1 || {
    tail -n 60 "$OUT.log" >&2
    echo "error: make_refs.py failed; full log: $OUT.log" >&2
    exit 1
  }
  grep -A2 'NOT PRODUCED' "$OUT.log" >&2 || true
  echo "references generated in $(($(date +%s) - t0)) s" >&2
  touch "$OUT/.complete"
fi
echo "$OUT"
