#!/usr/bin/env bash
# GPU checks that a machine without a GPU cannot run: the fixtures' parity on ONNX Runtime's
# CUDA (and TensorRT, when the ONNX Runtime there has it) provider, in both cache layouts
# (`--static` is the one TensorRT builds one engine for, and the one whose steps replay as
# CUDA graphs on cuda: with them and without), and `narx bench` of the NAR-B architecture at
# batch 1 and at a large batch.
#
#   scripts/gpu-check.sh [FIXTURES_DIR] [OUT_DIR]
#
# FIXTURES_DIR defaults to ../shared/fixtures, OUT_DIR to $OUT or ./gpu-check-out; PROVIDERS
# (default "cuda tensorrt") and BATCHES (default "1 16") choose what runs. It uses
# target/release/narx when present (built elsewhere and carried along), else builds it with
# cargo. ONNX Runtime comes from ORT_DYLIB_PATH or the Python `onnxruntime` package, which must
# be a GPU build (`onnxruntime-gpu`). Results: OUT_DIR/summary.txt and one JSON file per bench.
set -uo pipefail
cd "$(dirname "$0")/.."
FIXTURES="${1:-../shared/fixtures}"
OUT_DIR="${2:-${OUT:-gpu-check-out}}"
mkdir -p "$OUT_DIR"
PROVIDERS="${PROVIDERS:-cuda tensorrt}"
BATCHES="${BATCHES:-1 16}"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

say "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
python3 - <<'PY' 2>&1 | tee -a "$SUMMARY"
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, ort.get_device(), ort.get_available_providers())
except Exception as e:
    print("no onnxruntime python package:", e)
PY

if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  ORT_DYLIB_PATH="$(python3 - <<'PY'
import glob, os
try:
    import onnxruntime
    capi = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
    print(sorted(glob.glob(os.path.join(capi, "libonnxruntime.so*")))[-1])
except Exception:
    pass
PY
)"
fi
export ORT_DYLIB_PATH
say "ONNX Runtime library: ${ORT_DYLIB_PATH:-none found}"
# The provider libraries sit beside it; CUDA/cuDNN from pip wheels (nvidia-*) if present.
NVIDIA_LIBS="$(python3 -c 'import nvidia, os; print(":".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in os.listdir(p)))' 2>/dev/null || true)"
export LD_LIBRARY_PATH="$(dirname "${ORT_DYLIB_PATH:-.}"):${NVIDIA_LIBS}:${LD_LIBRARY_PATH:-}"

NARX=target/release/narx
if [ ! -x "$NARX" ]; then
  say "== building narx"
  cargo build --release --workspace 2>&1 | tail -3 | tee -a "$SUMMARY" || exit 1
fi
"$NARX" --version | tee -a "$SUMMARY"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Greedy tokens from `narx run --tokens-out` against the fixture's recorded tokens.
compare_tokens() {
  python3 - "$1" "$2" <<'PY'
import json, struct, sys
tokens_json, reference = sys.argv[1], sys.argv[2]
with open(reference, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    data = f.read()
meta = header["tokens"]
start, end = meta["data_offsets"]
raw = data[start:end]
expected = list(struct.unpack("<%dq" % (len(raw) // 8), raw))
got = [t for row in json.load(open(tokens_json))["tokens"] for t in row]
print("tokens match" if got == expected else "TOKENS DIFFER: got %s... expected %s..." % (got[:8], expected[:8]))
sys.exit(0 if got == expected else 1)
PY
}

parity() {
  local provider="$1" name="$2" layout="$3" graphs="${4:-}"
  local dir="$WORK/$name-$layout" flags=""
  [ "$layout" = static ] && flags="--static"
  python3 -c "import json,sys; json.dump(json.load(open('$FIXTURES/$name/reference.json'))['config'], open('$WORK/$name.json','w'))"
  if [ ! -d "$dir" ]; then
    # shellcheck disable=SC2086
    "$NARX" export --checkpoint "$FIXTURES/$name/model.safetensors" --config "$WORK/$name.json" $flags -o "$dir" >/dev/null || return 1
  fi
  local labels
  labels="$(python3 -c "import json; r=json.load(open('$FIXTURES/$name/reference.json')); print(' '.join(['--class %d' % l for l in r.get('labels', [])] + ['--cfg-scale %s --cfg-interval %s' % (r['cfg_scale'], r['cfg_interval'])]))")"
  # shellcheck disable=SC2086
  local run="$name-$layout-$provider$graphs"
  "$NARX" run "$dir" $labels --greedy --provider "$provider" $graphs --tokens-out "$WORK/$run.json" \
    > "$OUT_DIR/run-$run.log" 2>&1 || { say "$name ($layout $graphs) on $provider: run failed (see run-$run.log)"; tail -3 "$OUT_DIR/run-$run.log" | tee -a "$SUMMARY"; return 1; }
  printf '%s (%s %s) on %s: ' "$name" "$layout" "$graphs" "$provider" | tee -a "$SUMMARY"
  compare_tokens "$WORK/$run.json" "$FIXTURES/$name/reference.safetensors" | tee -a "$SUMMARY"
}

for provider in $PROVIDERS; do
  say "== parity on $provider"
  for name in nar-c2i-tiny nar-video-tiny; do
    parity "$provider" "$name" append
    parity "$provider" "$name" static
    # On cuda, static steps replay as CUDA graphs unless told not to.
    [ "$provider" = cuda ] && parity "$provider" "$name" static --no-cuda-graph
  done
done

say "== bench: NAR-B (random weights), 16x16, guidance 4, top-k 2000"
"$NARX" export --random-weights --preset nar-b --grid 16 -o "$WORK/nar-b" >/dev/null
"$NARX" export --random-weights --preset nar-b --grid 16 --static -o "$WORK/nar-b-static" >/dev/null
for provider in $PROVIDERS; do
  variants=("nar-b" "nar-b-static")
  [ "$provider" = cuda ] && variants+=("nar-b-static --no-cuda-graph")
  for variant in "${variants[@]}"; do
    read -r model graphs <<< "$variant"
    for batch in $BATCHES; do
      log="$OUT_DIR/bench-$model$graphs-$provider-b$batch"
      # shellcheck disable=SC2086
      if "$NARX" bench "$WORK/$model" --provider "$provider" $graphs --batch "$batch" --repeat 3 --json \
          > "$log.log" 2>&1; then
        tail -1 "$log.log" > "$log.json"
        say "$variant on $provider, batch $batch: $(grep -m1 's/image' "$log.log")"
      else
        say "$variant on $provider, batch $batch: bench failed (see $(basename "$log").log)"
      fi
    done
  done
done
say "== done"
