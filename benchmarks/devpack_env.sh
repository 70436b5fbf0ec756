# Sourced by benchmarks/device.sh and experiments/device.sh (from the repository root, with PY set): installs
# the carried wheels (devpack/whl) where grain or ml-collections is missing, sets the environment both use,
# and sets HW to the device's name.
if ! "$PY" -c 'import grain, ml_collections' 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site devpack/whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
HW=$(nvidia-smi -L 2>/dev/null | head -1 | sed 's/ (UUID.*//'); HW=${HW:-$("$PY" -c 'import jax; print(jax.devices()[0].device_kind)')}
