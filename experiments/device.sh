#!/usr/bin/env bash
# The experiment sweeps on a lent GPU machine (jax with CUDA, flax, optax, orbax; no TensorFlow, TFDS, grain,
# clu or ml-collections; no internet). Beside the working tree it needs, in the ignored folder devpack/:
#   devpack/whl/    grain, array-record, portpicker and ml-collections wheels (cp312, manylinux)
#   devpack/packs/  resized data packs: python -m unisegdiff_jax.packs --datasets=... --out=devpack/packs
# Usage (from the repository root): OUT=DIR JOBS=12 MINUTES=7 SWEEPS=method,targets bash experiments/device.sh
# MINUTES: start no run after this long; GRACE: minutes more for the runs still going (then SIGTERM); HARD_SECONDS:
# the runner is ended after this long whatever it is doing, so that the results are always packed before the
# device call's own limit. RUNNER_ARGS: more runner flags (--arms=..., --budget_settings=..., --smoke).
# Results come back as $OUT/results.tgz (the layout of experiments/results: `tar xzf results.tgz -C experiments`)
# and $OUT/runs.tgz (every run's summary, per-case results, scalars, log and workdir run.json, for `experiments.run --collect_only`);
# the device tool returns files, not deep folder trees. Runs and results stay in /tmp: a second call on the
# same warm machine skips what the first finished (its results come back again with the new ones).
set -u
OUT=${OUT:-/tmp/device_out}; JOBS=${JOBS:-12}; MINUTES=${MINUTES:-7}; GRACE=${GRACE:-4}
HARD_SECONDS=${HARD_SECONDS:-100000}
SWEEPS=${SWEEPS:-method,targets,encoder,budget,unified,control}
SEEDS=${SEEDS:-0,1,2}; SEED_DATASETS=${SEED_DATASETS:-kvasir_seg:2,busi:2,ph2:2,lgg_brain_mri:2,ddti_thyroid_us:2,unified:2}
PY=${PY:-python3}; PACK_DIR=${PACK_DIR:-devpack/packs}  # PACK_DIR: another pack folder (e.g. 32 px packs for --smoke)
mkdir -p "$OUT"
source benchmarks/devpack_env.sh  # wheels, environment, HW
echo "hardware: $HW; $(nproc) CPU cores; jobs $JOBS; deadline $MINUTES min"
timeout "$HARD_SECONDS" "$PY" -m experiments.run "$SWEEPS" --seeds="$SEEDS" --seed_datasets="$SEED_DATASETS" \
  --jobs="$JOBS" --deadline_minutes="$MINUTES" --grace_minutes="$GRACE" --hardware="$HW, $(nproc) CPU cores, $JOBS runs at once" \
  --root=/tmp/experiment_runs --results=/tmp/experiment_results/results ${RUNNER_ARGS:-} -- --config.data.pack_dir="$PACK_DIR"
status=$?
tar czf "$OUT/results.tgz" -C /tmp/experiment_results results
(cd /tmp/experiment_runs && find . \( -name summary.json -o -name per_case.csv -o -name scalars.jsonl -o -name 'log_*.txt' -o -name run.json \) \
  -not -path '*/checkpoints/*' | tar czf "$OUT/runs.tgz" -T -)
exit $status
