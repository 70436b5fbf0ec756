"""Benchmarks: `python -m benchmarks.run --config=configs/synthetic.py:smoke [--config.x=y ...] [--out=FILE]
[--only=train,inference,flops,input,memory,scaling] [--steps=10]`.

Prints one JSON line per measurement to stdout (everything else goes to stderr) and appends it to --out:
{"name", "value", "unit", "config", "device", "num_devices", "dtype", "overrides", ...extra fields}.
Nothing here asserts a time. A measurement that fails prints a line with "error" (value null); the others
still run and the exit status is 1.

  train      compile time (`trace().lower().compile()` of a fresh jit, with the trace and lowering seconds and
             the step's number of jaxpr equations, and the first call of another one, each with
             "cache_hit": whether the persistent compilation cache served it; --nocompilation_cache for cold
             numbers), median seconds per step and images/s over --steps steps after 2 warm-up steps, FLOPs
             per step (XLA cost analysis of the compiled, per-device program), on a GPU/TPU achieved FLOP/s
             and MFU against PEAK_FLOPS, and the fraction of loop time spent waiting for data (the real Grain
             iterator + host-to-device put, asynchronous dispatch as in the training loop).
  inference  seconds per network evaluation at batch 1 and config.sampling.batch_size (staged sampler),
             seconds per segmented image for the staged budget, 100-step DDIM (--ddim_steps) and a K=5 staged
             ensemble (compile excluded; one device; the median of up to 5 calls, fewer once 10 s are spent).
  flops      per-NFE FLOPs of the denoiser and the share of its per-level 1x1 feature projections (`fuse_*`,
             which depend only on the image), from XLA's cost analysis of the lowered programs (no compile).
  input      images/s of the training input pipeline alone with 0 and 2 Grain workers.
  memory     peak host RSS and, where the device reports it, peak device memory (run last).
  scaling    seconds per train step on 1, 2, 4, 8 devices at config.train.global_batch_size (an N that does
             not divide it is skipped): on CPU each N in a subprocess with N forced host devices (all sharing
             the same cores: this measures sharding overhead, not speed-up); on an accelerator a Mesh of
             min(N, device count) devices of this process.

fp32 vs bf16: run the command twice, the second time with `--config.model.dtype=bfloat16`; every line carries
"dtype", so the two outputs can be joined on "name".
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import config_flags
import numpy as np

from unisegdiff_jax import ensemble
from unisegdiff_jax import host
from unisegdiff_jax import input_pipeline
from unisegdiff_jax import config_checks
from unisegdiff_jax import inference
from unisegdiff_jax import phases
from unisegdiff_jax import train_state

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Configuration file (file.py or file.py:args).', lock_config=True)
flags.DEFINE_string('out', None, 'Also append the JSON lines to this file.')
flags.DEFINE_list('only', ['train', 'inference', 'input', 'memory', 'scaling'], 'The measurements to run.')
flags.DEFINE_integer('steps', 10, 'Timed train steps (after 2 warm-up steps).')
flags.DEFINE_integer('ddim_steps', 100, 'The DDIM budget whose seconds per image are measured.')
flags.DEFINE_bool('compilation_cache', True, "The persistent compilation cache main.py uses (off: cold compiles).")
flags.DEFINE_integer('scaling_child', 0, 'Internal: time the train step on this many devices, print it, exit.')
flags.mark_flags_as_required(['config'])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALING_DEVICES = (1, 2, 4, 8)
PEAK_FLOPS = {'H100': (989e12, 67e12), 'H200': (989e12, 67e12), 'A100': (312e12, 19.5e12)}  # (bf16 dense, fp32)
INPUT_BATCHES, INPUT_WARMUP = 36, 3
_STDOUT = sys.stdout  # JSON lines only; library output is redirected to stderr
_BASE: dict = {}  # fields of every line
_CACHE_HITS = [0]  # persistent compilation cache hits so far
_FAILED: list[str] = []  # measurements that printed an "error" line


def _setup_runtime() -> None:
  """Persistent compilation cache as in main.py; TensorFlow (if installed) kept off the accelerators."""
  if FLAGS.compilation_cache:
    host.use_compilation_cache()

  def count_hits(event: str, **_):
    if event == '/jax/compilation_cache/cache_hits':
      _CACHE_HITS[0] += 1
  jax.monitoring.register_event_listener(count_hits)
  host.keep_tensorflow_off_accelerators()


def _emit(name: str, value, unit: str | None, **extra) -> None:
  """Prints one measurement as a JSON line (non-finite numbers become null) and appends it to --out."""
  if isinstance(value, float) and not math.isfinite(value):
    value = None
  line = json.dumps({'name': name, 'value': value, 'unit': unit, **_BASE, **extra})
  print(line, file=_STDOUT, flush=True)
  if FLAGS.out:
    with open(FLAGS.out, 'a') as f:
      f.write(line + '\n')


def _guard(name: str, fn, *args) -> None:
  """Runs one measurement; a failure becomes an "error" line (traceback on stderr) and the run goes on."""
  try:
    fn(*args)
  except Exception as err:  # pylint: disable=broad-except
    traceback.print_exc()
    _FAILED.append(name)
    _emit(name, None, None, error=f'{type(err).__name__}: {" ".join(str(err).split())}'[:500])


def _median_time(fn, repeats: int, budget_s: float = 10.0) -> float:
  """Median seconds of `fn()` over `repeats` calls, fewer (at least one) once `budget_s` is spent: a 100-step
  DDIM batch takes ~50 s on the 2-core CPU, and the whole benchmark must stay under 10 minutes there."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
    if sum(times) >= budget_s:
      break
  return statistics.median(times)


def _random_batch(config, batch: int) -> dict:
  rng = np.random.default_rng(0)
  size = config.data.image_size
  return {'image': rng.uniform(-1, 1, (batch, size, size, 3)).astype('float32'),
          'mask': (rng.random((batch, size, size, 1)) < 0.3).astype('float32')}


# ---------------------------------------------------------------------------------------------------------
# Train step.


def _train_setup(config, devices):
  """(make_jit, state, batch, rng, batch_sharding) for the diffusion train step on a Mesh of `devices`; the
  jitted step takes (state, batch, rng) (phases.jit_step: the run's learning-rate schedule bound)."""
  process = config_checks.validate_config(config, num_devices=len(devices))
  model, optimizer, _ = phases.diffusion_parts(config, process)
  mesh = Mesh(np.asarray(devices), ('data',))
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  rng = jax.random.PRNGKey(config.seed)
  # Under jit, as train.py does: params and ema_params become distinct buffers (both are donated).
  state = jax.jit(lambda r: train_state.create_train_state(model, config, optimizer, r), out_shardings=replicated)(rng)

  def make_jit():  # a fresh jit object each time: its own in-memory compilation cache
    step = functools.partial(train_state.train_step, model=model, optimizer=optimizer, process=process,
                             config=config)
    return phases.jit_step(step, replicated, batch_sharding, train_state.schedule_args(config))

  batch = jax.device_put(_random_batch(config, config.train.global_batch_size), batch_sharding)
  return make_jit, state, batch, jax.device_put(rng, replicated), batch_sharding


def _timed_steps(jitted, state, batch, rng, steps: int):
  """(state, median seconds per step) over `steps` blocked steps after 2 warm-up steps."""
  times = []
  for i in range(steps + 2):
    start = time.perf_counter()
    state, _ = jax.block_until_ready(jitted(state, batch, rng))
    if i >= 2:
      times.append(time.perf_counter() - start)
  return state, statistics.median(times)


def _step_seconds(config, devices) -> float:
  make_jit, state, batch, rng, _ = _train_setup(config, devices)
  return _timed_steps(make_jit(), state, batch, rng, FLAGS.steps)[1]


def _flops(compiled) -> float | None:
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def _peak_flops(device_kind: str, dtype: str) -> float | None:
  for kind, (bf16, fp32) in PEAK_FLOPS.items():
    if kind.lower() in device_kind.lower():
      return bf16 if dtype == 'bfloat16' else fp32
  return None


def _data_wait(config, jitted, state, rng, sharding, steps: int) -> tuple[float, float]:
  """(fraction of loop time in next(iterator) + host-to-device put, seconds of it per step)."""
  iterator = input_pipeline.create_train_iterator(config)

  def fetch():
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in next(iterator).items()}

  for _ in range(2):
    state, _ = jitted(state, fetch(), rng)
  jax.block_until_ready(state)
  waited, start = 0.0, time.perf_counter()
  for _ in range(steps):
    t0 = time.perf_counter()
    batch = fetch()
    waited += time.perf_counter() - t0
    state, _ = jitted(state, batch, rng)  # no per-step sync, as in the training loop
  jax.block_until_ready(state)
  iterator.close()
  return waited / (time.perf_counter() - start), waited / steps


def bench_train(config) -> None:
  devices = jax.devices()
  make_jit, state, batch, rng, batch_sharding = _train_setup(config, devices)
  b = config.train.global_batch_size
  common = {'global_batch': b, 'image_size': config.data.image_size}
  hits, t0 = _CACHE_HITS[0], time.perf_counter()
  traced = make_jit().trace(state, batch, rng)
  t_trace = time.perf_counter()
  lowered = traced.lower()
  t1 = time.perf_counter()
  compiled = lowered.compile()
  _emit('train/compile_s', time.perf_counter() - t1, 's', trace_s=t_trace - t0, lower_s=t1 - t_trace,
        jaxpr_eqns=len(traced.jaxpr.eqns), cache_hit=_CACHE_HITS[0] > hits, **common)
  jitted, hits, t0 = make_jit(), _CACHE_HITS[0], time.perf_counter()
  state, _ = jax.block_until_ready(jitted(state, batch, rng))
  _emit('train/first_call_s', time.perf_counter() - t0, 's', cache_hit=_CACHE_HITS[0] > hits, **common)
  state, step_s = _timed_steps(jitted, state, batch, rng, FLAGS.steps)
  _emit('train/step_s', step_s, 's', steps=FLAGS.steps, **common)
  _emit('train/images_per_s', b / step_s, 'images/s', **common)
  flops = _flops(compiled)
  _emit('train/flops_per_step', flops, 'FLOP', **common)
  if jax.default_backend() != 'cpu':  # the cost analysis is of the per-device program: MFU per device
    achieved = flops / step_s if flops else None
    peak = _peak_flops(devices[0].device_kind, config.model.dtype)
    _emit('train/flops_per_s', achieved, 'FLOP/s', **common)
    _emit('train/mfu', achieved / peak if achieved and peak else None, 'fraction', peak_flops=peak, **common)
  fraction, wait_s = _data_wait(config, jitted, state, rng, batch_sharding, FLAGS.steps)
  _emit('train/data_wait_fraction', fraction, 'fraction', wait_s_per_step=wait_s,
        worker_count=config.data.worker_count, steps=FLAGS.steps, **common)


# ---------------------------------------------------------------------------------------------------------
# Inference, input pipeline, memory, scaling.


def bench_inference(config) -> None:
  process = config_checks.validate_config(config)
  model, _, _ = phases.diffusion_parts(config, process)
  rng = jax.random.PRNGKey(config.seed)
  params = jax.jit(lambda r: train_state.init_params(model, config, r))(rng)  # eager flax init is slow
  batch, repeats = config.sampling.batch_size, max(1, min(FLAGS.steps, 5))
  images = jax.device_put(_random_batch(config, batch)['image'])
  names = [f'bench_{i}' for i in range(batch)]
  staged = ensemble.settings_from_config(config, sampler='staged', ensemble_size=1)
  members_fn, nfe = phases.diffusion_members(model, process, staged)
  members = jax.jit(members_fn)
  for n in sorted({1, batch}):
    keys = ensemble.case_keys(rng, names[:n], n)
    run = lambda n=n, keys=keys: jax.block_until_ready(members(params, images[:n], keys))
    run()  # compile
    _emit('inference/s_per_nfe', _median_time(run, repeats) / nfe, 's', batch=n, sampler=staged.label)
  host_images = np.asarray(images)
  ddim = ensemble.Settings('ddim', FLAGS.ddim_steps, 1, 'mean', 0.5)
  for settings in (staged, ddim, dataclasses.replace(staged, ensemble_size=5)):
    fn, nfe_per_image = phases.diffusion_members(model, process, settings)
    engine = inference.Engine(fn, settings, image_size=config.data.image_size, batch_size=batch)
    engine.compile(params, rng)
    run = lambda engine=engine: engine.run(params, host_images, names, rng)  # the evaluation / predict path
    _emit('inference/s_per_image', _median_time(run, repeats) / batch, 's', sampler=settings.label,
          ensemble_size=settings.ensemble_size, nfe=nfe_per_image, batch=batch,
          compile_s=round(engine.compile_seconds, 2))


def bench_flops(config) -> None:
  process = config_checks.validate_config(config, num_devices=1)
  model = phases.diffusion_parts(config, process)[0]
  params = jax.eval_shape(lambda: train_state.init_params(model, config, jax.random.PRNGKey(0)))
  size = config.data.image_size
  image = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
  conditioning = jax.eval_shape(lambda p, i: model.apply(p, i, method=model.encode), params, image)
  x_t, t = jax.ShapeDtypeStruct((1, size, size, 1), np.float32), jax.ShapeDtypeStruct((1,), np.int32)
  denoise = jax.jit(lambda p, c, x, t: model.apply(p, c, x, t, t, method=model.denoise))
  denoiser = params['params']['denoiser']

  def projections(dp, features):  # the fuse_* 1x1 convolutions alone
    return [jnp.einsum('bhwc,cd->bhwd', f, dp[f'fuse_{level}']['kernel'][0, 0]) + dp[f'fuse_{level}']['bias']
            for level, f in enumerate(features)]

  def flops(lowered):
    cost = lowered.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)['flops'])

  total = flops(denoise.lower(params, conditioning, x_t, t))
  fuse = flops(jax.jit(projections).lower(denoiser, conditioning['features']))
  _emit('flops/denoiser_per_nfe', total, 'FLOP', batch=1, image_size=size)
  _emit('flops/feature_projection_fraction', fuse / total, 'fraction', projection_flops=fuse, batch=1)


def bench_input(config) -> None:
  for workers in (0, 2):
    cfg = config.copy_and_resolve_references()
    cfg.data.worker_count = workers
    iterator = input_pipeline.create_train_iterator(cfg)
    for _ in range(INPUT_WARMUP):
      next(iterator)
    start = time.perf_counter()
    for _ in range(INPUT_BATCHES):
      next(iterator)
    elapsed = time.perf_counter() - start
    iterator.close()
    _emit('input/images_per_s', INPUT_BATCHES * cfg.train.global_batch_size / elapsed, 'images/s',
          worker_count=workers, batches=INPUT_BATCHES, image_size=cfg.data.image_size)


def bench_memory(config) -> None:
  del config
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
  _emit('memory/host_peak_rss', rss / (2 ** 20 if sys.platform == 'darwin' else 1024), 'MiB')
  stats = jax.devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    _emit('memory/device_peak', stats['peak_bytes_in_use'] / 2 ** 20, 'MiB', bytes_limit=stats.get('bytes_limit'))


def _config_args() -> list[str]:
  """The --config and --config.* arguments of this command line (forwarded to subprocesses)."""
  args, argv = [], sys.argv[1:]
  for i, arg in enumerate(argv):
    if arg.split('=', 1)[0] == '--config' or arg.startswith('--config.'):
      args += [arg] if '=' in arg or i + 1 == len(argv) else [arg, argv[i + 1]]
  return args


def _scaling_subprocess(n: int) -> float:
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip(),
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
  cache = '--compilation_cache' if FLAGS.compilation_cache else '--nocompilation_cache'
  done = subprocess.run([sys.executable, '-m', 'benchmarks.run', *_config_args(), f'--steps={FLAGS.steps}',
                         cache, f'--scaling_child={n}'], env=env, stdout=subprocess.PIPE, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f'the {n}-device subprocess exited with {done.returncode} (its stderr is above)')
  return json.loads(done.stdout.strip().splitlines()[-1])['step_s']


def bench_scaling(config) -> None:
  b = config.train.global_batch_size
  on_cpu = jax.default_backend() == 'cpu'
  counts = SCALING_DEVICES if on_cpu else sorted({min(n, jax.device_count()) for n in SCALING_DEVICES})
  for n in counts:
    if b % n:
      print(f'scaling: skipped {n} devices (global batch {b} is not divisible by {n})', file=sys.stderr)
      continue

    def measure(n=n):
      step_s = _scaling_subprocess(n) if on_cpu else _step_seconds(config, jax.devices()[:n])
      _emit('scaling/step_s', step_s, 's', num_devices=n, global_batch=b, images_per_s=b / step_s,
            mode='forced host devices, subprocess' if on_cpu else 'mesh')
    _guard('scaling/step_s', measure)


BENCHMARKS = {'train': bench_train, 'inference': bench_inference, 'flops': bench_flops, 'input': bench_input,
              'scaling': bench_scaling, 'memory': bench_memory}  # memory last: the peak of everything before


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  unknown = set(FLAGS.only) - set(BENCHMARKS)
  if unknown:
    raise app.UsageError(f"--only: unknown {', '.join(sorted(unknown))}; use {', '.join(BENCHMARKS)}")
  _setup_runtime()
  config = FLAGS.config
  with contextlib.redirect_stdout(sys.stderr):
    if FLAGS.scaling_child:
      if jax.device_count() < FLAGS.scaling_child:
        raise RuntimeError(f'{FLAGS.scaling_child} devices asked for, {jax.device_count()} present')
      step_s = _step_seconds(config, jax.devices()[:FLAGS.scaling_child])
      print(json.dumps({'step_s': step_s}), file=_STDOUT, flush=True)
      return
    overrides = {k: v for k, v in config_flags.get_override_values(FLAGS['config']).items()
                 if k not in ('data.data_dir', 'data.pack_dir')}
    _BASE.update(config=FLAGS['config'].config_filename, device=jax.devices()[0].device_kind,
                 num_devices=jax.device_count(), dtype=config.model.dtype, overrides=overrides)
    for name, fn in BENCHMARKS.items():
      if name in FLAGS.only:
        _guard(name, fn, config)
  sys.exit(1 if _FAILED else 0)


if __name__ == '__main__':
  app.run(main)
