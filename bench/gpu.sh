#!/usr/bin/env bash
# One prepared GPU benchmark (issue 16). Prints JSON lines on stdout, each tagged with "bench":
#   device    torch, CUDA and the GPU
#   train     bench/train_step.py: img/s and peak memory of bicaptioning_R_50_L1_H2048 at batch 64 and 256,
#             fp32, bf16, bf16+channels_last, bf16+channels_last+compile (inductor)
#   ac        the same step at batch 256 with model.activation_checkpointing (peak memory with and without)
#   loader    bench/dataloader.py: the training loader's img/s on synthetic COCO-sized JPEGs, CPU decoding in
#             the workers and (loader_gpu) shards decoded on the GPU with data.decode_device=cuda
#   svm       bench/voc07_svm.py: the VOC07 SVM protocol on VOC-sized features, batched solver on the GPU
#   decode    bench/decode.py: beam-search captioning img/s
# A piece that fails or runs out of its time prints {"bench": ..., "error": ...} and the rest still run;
# the whole stays under 8 minutes (each piece has a time limit; the sum of the limits is 470 s).
#
#   bench/gpu.sh             # on a machine with a CUDA GPU
#   bench/gpu.sh --dry-run   # every piece on the CPU at toy sizes, in well under a minute (the test suite runs it)
#
# Exit status: 0 when every piece printed its lines, 1 otherwise. PYTHON overrides the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bench/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac
STATUS=0
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT

# run TAG LIMIT_S CMD...: the command's JSON lines, tagged; an error line if it fails or prints none
run() {
  local tag=$1 limit=$2; shift 2
  local out="$LOG/$tag.out"
  timeout --kill-after=10 "$limit" "$PY" "$@" >"$out" 2>"$LOG/$tag.err"
  local rc=$?
  sed -n "s/^{/{\"bench\": \"$tag\", /p" "$out"
  if [ "$rc" -ne 0 ] || ! grep -q '^{' "$out"; then
    STATUS=1
    local why
    why=$(tail -n 1 "$LOG/$tag.err" | tr -d '"\\' | cut -c1-300)
    [ "$rc" -eq 124 ] && why="ran past its ${limit} s limit"
    echo "{\"bench\": \"$tag\", \"error\": \"exit $rc: $why\"}"
    tail -n 20 "$LOG/$tag.err" >&2
  fi
}

if [ "$DRY" -eq 1 ]; then
  DEVICE=cpu
  TOY=(model.backbone=resnet18 model.visual_width=16 model.textual.hidden=64 model.vocab_size=1000)
  TRAIN=(--batch-sizes 2 4 --image-size 32 --steps 1 --warmup-steps 1 "${TOY[@]}" train.compile_backend=eager)
  AC=(--batch-sizes 4 --image-size 32 --steps 1 --warmup-steps 1 "${TOY[@]}")
  LOADER=(--synthetic 24 --workers 1 --batch-size 4 --batches 2 --warmup-batches 1 --image-size 32)
  SVM=(--train-rows 300 --test-rows 300 --dims 64 --classes 5 --device cpu)
  DECODE=(--batch-size 2 --beam-size 2 --max-steps 5 --image-size 32 --repeats 1 --warmup 0 --no-limit "${TOY[@]}")
  LIMITS=(300 300 300 300 300)  # generous: a busy 2-core CI machine runs the toys 5x slower than an idle one
else
  DEVICE=cuda
  TRAIN=(--batch-sizes 64 256 --image-size 224 --steps 10 --warmup-steps 3)
  AC=(--batch-sizes 256 --image-size 224 --steps 5 --warmup-steps 2)
  LOADER=(--synthetic 1024 --workers "$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))" --batch-size 128 --batches 6
          --warmup-batches 2 --image-size 224)
  SVM=(--device cuda)
  DECODE=(--batch-size 32 --beam-size 5 --max-steps 30 --repeats 3 --warmup 1)
  LIMITS=(240 40 50 40 50)
fi
CONFIG=bicaptioning_R_50_L1_H2048

run device 30 -c "import json, torch; d = torch.device('$DEVICE'); print(json.dumps({'device': '$DEVICE', 'torch': torch.__version__, 'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name(d) if d.type == 'cuda' else None, 'dry_run': bool($DRY)}))"
if [ "$DRY" -eq 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo '{"bench": "device", "error": "no CUDA device: run bench/gpu.sh --dry-run on a CPU machine"}'
  exit 1
fi
# order: the compiled variants last, so a slow compilation cannot cost the other figures
run train "${LIMITS[0]}" bench/train_step.py --config "$CONFIG" --device "$DEVICE" "${TRAIN[@]}" \
  --variants fp32 bf16 bf16+channels_last bf16+channels_last+compile
run ac "${LIMITS[1]}" bench/train_step.py --config "$CONFIG" --device "$DEVICE" "${AC[@]}" --variants bf16+channels_last+ac
run loader "${LIMITS[2]}" bench/dataloader.py "${LOADER[@]}"
if [ "$DRY" -eq 0 ]; then  # GPU decoding needs the GPU: not part of the CPU dry run
  run loader_gpu "${LIMITS[2]}" bench/dataloader.py "${LOADER[@]}" --decode-device cuda
fi
run svm "${LIMITS[3]}" bench/voc07_svm.py "${SVM[@]}"
run decode "${LIMITS[4]}" bench/decode.py --config "$CONFIG" --device "$DEVICE" "${DECODE[@]}"
exit "$STATUS"
