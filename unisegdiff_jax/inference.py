"""One inference engine for validation, test evaluation, the budget sweep and predict.

An `Engine` wraps a members function `(params, images [B,S,S,3], keys [B,2]) -> probabilities [K,B,S,S,1]`
(the diffusion sampler with K ensemble members, or the phase-0 segmenter with K = 1) and

- compiles it once, for one global batch shape (`config.sampling.batch_size`); shorter batches are padded;
- draws every image's sampling noise from its own key (`ensemble.case_keys`, from the image's name), so a
  case's mask does not depend on the batch, position or batch size it is segmented in;
- fuses the K members on the device (mean / vote, and the members' std for the uncertainty map; STAPLE,
  an iterative per-image EM, runs on the host);
- is multi-host correct: every process is given the same global batch and feeds only its own rows (process p
  the rows [p*B/P, (p+1)*B/P)) as one global array; the fused outputs are gathered on every process with
  `multihost_utils.process_allgather`, so all processes compute the same summary (process 0 writes files).

`restore_ema_params` restores only what inference needs, the EMA parameters, not the optimiser state.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unisegdiff_jax import checkpointing
from unisegdiff_jax import ensemble
from unisegdiff_jax import input_pipeline


@dataclasses.dataclass
class Output:
  """Fused outputs of a batch of n images at the network resolution (numpy)."""
  prob: np.ndarray  # [n, S, S, 1] fused foreground probability
  std: np.ndarray  # [n, S, S, 1] std of the member probabilities (zeros for one member)
  ensemble_size: int

  def fused(self, i: int, settings: ensemble.Settings) -> ensemble.Fused:
    prob = self.prob[i]
    return ensemble.Fused(prob=prob, mask=prob >= ensemble.mask_threshold(settings.fusion, settings.threshold),
                          std=self.std[i], entropy=ensemble.binary_entropy(prob),
                          ensemble_size=self.ensemble_size)


def _fuse_on_device(members: jnp.ndarray, settings: ensemble.Settings):
  """[K, B, ...] -> (fused probability, member std) for mean and vote; STAPLE returns the members."""
  if settings.fusion == 'mean':
    prob = members.mean(axis=0)
  elif settings.fusion == 'vote':
    prob = (members >= settings.threshold).astype(jnp.float32).mean(axis=0)
  else:
    return members
  return prob, members.std(axis=0)


class Engine:
  """Compiled once per (members function, global batch shape); see the module docstring."""

  def __init__(self, members_fn: Callable, settings: ensemble.Settings, *, image_size: int, batch_size: int,
               mesh: Mesh | None = None):
    self.settings = settings
    self.image_size = int(image_size)
    self.batch_size = int(batch_size)
    mesh = mesh if mesh is not None else Mesh(np.asarray(jax.devices()), ('data',))
    self._replicated = NamedSharding(mesh, P())
    self._rows = NamedSharding(mesh, P('data'))
    host_staple = settings.fusion == 'staple' and settings.ensemble_size > 1
    out_sharding = NamedSharding(mesh, P(None, 'data')) if host_staple else (self._rows, self._rows)

    def run(params, images, keys):
      members = members_fn(params, images, keys)
      return members if host_staple else _fuse_on_device(members, settings)

    self._jitted = jax.jit(run, in_shardings=(self._replicated, self._rows, self._rows), out_shardings=out_sharding)
    self._compiled = None
    self.compile_seconds = 0.0

  # The rows of each global batch this process feeds.
  def _local(self, array: np.ndarray) -> jax.Array:
    count, index = jax.process_count(), jax.process_index()
    per = self.batch_size // count
    return jax.make_array_from_process_local_data(self._rows, array[index * per:(index + 1) * per],
                                                  (self.batch_size,) + array.shape[1:])

  def _inputs(self, images: np.ndarray, names: Sequence[str], rng: jax.Array):
    padded = np.zeros((self.batch_size, self.image_size, self.image_size, 3), np.float32)
    padded[:len(images)] = images
    return self._local(padded), self._local(ensemble.case_keys(rng, list(names), self.batch_size))

  def compile(self, params, rng: jax.Array) -> None:
    """Compiles (once) and runs one untimed batch: first-run allocations stay out of the timings."""
    if self._compiled is not None:
      return
    start = time.perf_counter()
    images, keys = self._inputs(np.zeros((0, self.image_size, self.image_size, 3), np.float32), [], rng)
    self._compiled = self._jitted.lower(params, images, keys).compile()
    jax.block_until_ready(self._compiled(params, images, keys))
    self.compile_seconds = time.perf_counter() - start

  def run(self, params, images: np.ndarray, names: Sequence[str], rng: jax.Array) -> Output:
    """Fused outputs for up to `batch_size` images [n, S, S, 3] (float, network size) named `names`."""
    if len(images) > self.batch_size:
      raise ValueError(f'{len(images)} images in one call; the engine batch is {self.batch_size}')
    self.compile(params, rng)
    out = self._compiled(params, *self._inputs(images, names, rng))
    gather = ((lambda x: multihost_utils.process_allgather(x, tiled=True)) if jax.process_count() > 1
              else np.asarray)
    n, k_members = len(images), self.settings.ensemble_size
    if isinstance(out, tuple):
      prob, std = (np.asarray(gather(x))[:n] for x in out)
    else:  # STAPLE on the host, per image
      members = np.asarray(gather(out))[:, :n]
      prob = np.stack([ensemble.fuse(members[:, i], 'staple', self.settings.threshold).prob for i in range(n)])
      std = members.std(axis=0)
    return Output(prob=prob.astype(np.float32), std=std.astype(np.float32), ensemble_size=k_members)

  def segment_cases(self, params, cases: Sequence[input_pipeline.EvalCase], rng: jax.Array
                    ) -> tuple[list[np.ndarray], float]:
    """Native-resolution fused probabilities of `cases` and the seconds per image (sampling + fusion +
    transfer; compilation excluded). Every process gets all cases and all results."""
    from unisegdiff_jax import evaluate  # pylint: disable=g-import-not-at-top  (evaluate imports this module)
    self.compile(params, rng)
    out, seconds = [], 0.0
    for chunk in input_pipeline.batched(list(cases), self.batch_size):
      images = np.stack([input_pipeline.resize_image(c.image, self.image_size) for c in chunk])
      start = time.perf_counter()
      result = self.run(params, images, [f'{c.dataset}/{c.case_id}' for c in chunk], rng)
      seconds += time.perf_counter() - start
      out.extend(evaluate.resize_probability(result.prob[i, ..., 0], *case.mask.shape)
                 for i, case in enumerate(chunk))
    return out, seconds / max(len(cases), 1)


def restore_ema_params(ckpt_dir: str, abstract_ema_params, *, checkpoint_step: int | None = None, keep: int = 2):
  """(EMA params, step) of the checkpoint `checkpoint_step`, or of the best by validation Dice when None.

  Reads only the `ema_params` subtree of the stored train state (orbax partial restore): no optimiser state
  or raw parameters are read or allocated.
  """
  if not os.path.isdir(ckpt_dir):  # checked first: the orbax manager would create the directory
    raise checkpointing.CheckpointError(f'no checkpoint in {ckpt_dir}: train first (--mode=train)')
  manager = checkpointing.create_manager(ckpt_dir, keep=keep, state_handler=ocp.PyTreeCheckpointHandler())
  try:
    step = checkpoint_step if checkpoint_step is not None else checkpointing.best_step(manager)
    if step is None:
      raise checkpointing.CheckpointError(f'no checkpoint in {ckpt_dir}: train first (--mode=train)')
    if step not in manager.all_steps():
      raise checkpointing.CheckpointError(
          f'no checkpoint step {step} in {ckpt_dir} (kept steps: {list(manager.all_steps())})')
    target = {'ema_params': abstract_ema_params}
    checkpointing.check_shapes(manager, step, target, partial=True)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
  finally:
    manager.close()
  return restored['state']['ema_params'], int(step)
