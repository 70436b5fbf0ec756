#!/usr/bin/env bash
# The accelerator check: the benchmark at full scale in fp32 and bf16 (step time, MFU, inference, memory) and a
# short full-resolution Kvasir-SEG training + test evaluation, on a lent GPU machine as it is (jax with CUDA,
# flax, optax, orbax, numpy, pillow; no TensorFlow, TFDS, grain, clu or ml-collections; no internet).
#
# Beside the working tree it needs, in the ignored folder devpack/ (never committed):
#   devpack/whl/       grain, array-record, portpicker and ml-collections wheels (cp312, manylinux)
#   devpack/packs256/  python -m unisegdiff_jax.packs --datasets=kvasir_seg --image_size=256 \
#                          --image_format=jpeg --out=devpack/packs256          (23 MB)
# On the device tool: carry ["devpack/whl", "devpack/packs256"], command
#   OUT=$OUT bash benchmarks/device.sh        (about 8 minutes on one H100 / H200; timeout_s 560)
# It writes $OUT/bench_float32.jsonl, $OUT/bench_bfloat16.jsonl (one JSON line per measurement, see
# benchmarks/run.py), $OUT/kvasir256_summary.json (the short run's test summary) and $OUT/log.txt.
#
# Everything is an environment variable, so the same script runs here on CPU at a tiny size (the test):
#   CONFIG (configs/polyp.py)  PACKS (devpack/packs256)  DTYPES ("float32 bfloat16")
#   BENCH_ONLY (train,inference,flops,memory)  BENCH_STEPS (10)  BENCH_DDIM (100)  PRE_STEPS (300)  TRAIN_STEPS (600)
#   BENCH_ARGS (extra --config.* flags for the benchmark)  RUN_ARGS (extra --config.* flags for the short run)
set -u -o pipefail
OUT=${OUT:-/tmp/device_bench}; PY=${PY:-python3}
CONFIG=${CONFIG:-configs/polyp.py}; PACKS=${PACKS:-devpack/packs256}; DTYPES=${DTYPES:-float32 bfloat16}
BENCH_ONLY=${BENCH_ONLY:-train,inference,flops,memory}; BENCH_STEPS=${BENCH_STEPS:-10}; BENCH_DDIM=${BENCH_DDIM:-100}
PRE_STEPS=${PRE_STEPS:-300}; TRAIN_STEPS=${TRAIN_STEPS:-600}; BENCH_ARGS=${BENCH_ARGS:-}; RUN_ARGS=${RUN_ARGS:-}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
source benchmarks/devpack_env.sh  # wheels, environment, HW
echo "hardware: $HW; $(nproc) CPU cores; config $CONFIG; packs $PACKS"
status=0
for dtype in $DTYPES; do
  echo "== benchmark, $dtype"
  "$PY" -m benchmarks.run --config="$CONFIG" --config.data.pack_dir="$PACKS" --config.model.dtype="$dtype" \
    --only="$BENCH_ONLY" --steps="$BENCH_STEPS" --ddim_steps="$BENCH_DDIM" \
    --out="$OUT/bench_$dtype.jsonl" $BENCH_ARGS || status=1
done
echo "== short training + test evaluation ($PRE_STEPS + $TRAIN_STEPS steps)"
RUN_DIR=$(mktemp -d /tmp/device_run.XXXXXX)  # its own folder: two copies of the script never share one
"$PY" main.py --config="$CONFIG" --workdir="$RUN_DIR" --config.data.pack_dir="$PACKS" \
  --config.pretrain.num_steps="$PRE_STEPS" --config.pretrain.eval_every_steps="$PRE_STEPS" \
  --config.train.num_steps="$TRAIN_STEPS" --config.train.eval_every_steps="$TRAIN_STEPS" \
  --config.train.checkpoint_every_steps="$TRAIN_STEPS" --config.optim.warmup_steps=50 $RUN_ARGS || status=1
cp "$RUN_DIR"/eval/test/summary.json "$OUT/kvasir256_summary.json" 2>/dev/null || status=1
grep -h steps_per_sec "$RUN_DIR"/scalars.jsonl > "$OUT/kvasir256_steps_per_sec.jsonl" 2>/dev/null
rm -rf "$RUN_DIR"
exit $status
