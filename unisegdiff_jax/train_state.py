"""The train state, the optimiser, and one guarded optimiser step (EMA, non-finite skip).

Both phases share `apply_gradients`: a non-finite loss or gradient norm never reaches the parameters (the
step counter still advances so the data and rng streams stay aligned) and is reported in `metrics['finite']`,
which the loop reads only at its sync steps.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from unisegdiff_jax import checkpointing
from unisegdiff_jax import diffusion
from unisegdiff_jax import losses
from unisegdiff_jax import schedules


class NonFiniteError(FloatingPointError):
  """A non-finite loss or gradient under `config.train.nonfinite='stop'`."""


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  opt_state: Any
  ema_params: Any


@dataclasses.dataclass(frozen=True)
class PackedOptimizer:
  """An optax transformation applied to the parameters packed into one flat vector per group: `train`, and
  `pretrained` for the top-level subtrees in `pretrained_names` (phase 1 with a pre-trained encoder).

  Element-wise optimisers (clipping by global norm, AdamW, scaling) give the same update on the packed vectors
  as leaf by leaf, but the step traces, compiles and launches a handful of operations instead of a dozen per
  parameter leaf (169 in the smoke model). The optimiser state holds one vector per group and moment.
  """
  tx: optax.GradientTransformation
  pretrained_names: tuple[str, ...] = ()

  def _groups(self, tree) -> tuple[list[str], Any, list]:
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    groups = []
    for path, _ in paths_and_leaves:
      top = path[1].key if len(path) > 1 and isinstance(path[1], jax.tree_util.DictKey) else None
      groups.append('pretrained' if top in self.pretrained_names else 'train')
    return groups, treedef, [leaf for _, leaf in paths_and_leaves]

  def pack(self, tree) -> dict[str, jax.Array]:
    """{group: the group's leaves raveled and concatenated, in tree order}."""
    groups, _, leaves = self._groups(tree)
    packed = {}
    for name in dict.fromkeys(groups):
      members = [leaf for group, leaf in zip(groups, leaves) if group == name]
      dtypes = {jnp.result_type(leaf) for leaf in members}
      if len(dtypes) != 1:
        raise ValueError(f'parameter group {name!r} mixes dtypes {sorted(map(str, dtypes))}')
      packed[name] = jnp.concatenate([jnp.ravel(leaf) for leaf in members])
    return packed

  def unpack(self, packed: dict[str, jax.Array], like):
    """The inverse of `pack`, shaped like the tree `like`."""
    groups, treedef, leaves = self._groups(like)
    pieces = {}
    for name, vector in packed.items():
      shapes = [jnp.shape(leaf) for group, leaf in zip(groups, leaves) if group == name]
      offsets = np.cumsum([int(np.prod(shape)) for shape in shapes])[:-1]
      pieces[name] = iter([part.reshape(shape) for part, shape in zip(jnp.split(vector, offsets), shapes)])
    return treedef.unflatten([next(pieces[group]) for group in groups])

  def init(self, params):
    return self.tx.init(self.pack(params))

  def update(self, packed_grads, opt_state, packed_params):
    return self.tx.update(packed_grads, opt_state, packed_params)


def make_optimizer(config: ml_collections.ConfigDict, pretrained_names=()) -> PackedOptimizer:
  """Clipping + AdamW at unit rate (the step applies the warm-up / cosine schedule, `schedule_args`);
  pre-trained top-level subtrees (phase 1) are frozen (`config.pretrain.encoder_mode='frozen'`) or fine-tuned
  at `finetune_lr_multiplier` times the rate."""
  schedule = schedules.unit_rate
  adamw = optax.adamw(schedule, weight_decay=config.optim.weight_decay)
  if pretrained_names:
    if config.pretrain.encoder_mode == 'frozen':
      pretrained_tx = optax.set_to_zero()
    else:
      pretrained_tx = optax.chain(optax.adamw(schedule, weight_decay=config.optim.weight_decay),
                                  optax.scale(config.pretrain.finetune_lr_multiplier))
    adamw = optax.multi_transform({'train': adamw, 'pretrained': pretrained_tx},
                                  lambda packed: {name: name for name in packed})
  return PackedOptimizer(optax.chain(optax.clip_by_global_norm(config.optim.grad_clip_norm), adamw),
                         tuple(pretrained_names))


def schedule_args(config: ml_collections.ConfigDict) -> np.ndarray:
  """The diffusion phase's learning-rate schedule, as the train step's `schedule` argument."""
  return schedules.schedule_args(config.optim.learning_rate, config.optim.warmup_steps, config.train.num_steps)


def init_params(model, config: ml_collections.ConfigDict, rng: jax.Array):
  size = config.data.image_size
  image = jnp.zeros((1, size, size, 3), jnp.float32)
  x_t = jnp.zeros((1, size, size, 1), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  return model.init(rng, image, x_t, t, t)


def new_state(params, optimizer: PackedOptimizer) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    ema_params=params)


def create_train_state(model, config: ml_collections.ConfigDict, optimizer, rng: jax.Array) -> TrainState:
  return new_state(init_params(model, config, rng), optimizer)


def apply_gradients(state: TrainState, loss_and_grads, optimizer, config: ml_collections.ConfigDict, schedule):
  """((loss, metrics), grads) -> (new state, metrics + grad_norm + finite); the optimiser's (unit-rate)
  update scaled by the learning rate of `schedule` (schedules.schedule_args) at this step; EMA with warm-up."""
  (loss, metrics), grads = loss_and_grads
  grads, params, ema = (optimizer.pack(tree) for tree in (grads, state.params, state.ema_params))
  updates, opt_state = optimizer.update(grads, state.opt_state, params)
  rate = schedules.learning_rate(state.step, schedule)
  new_params = {name: params[name] + (rate * updates[name]).astype(params[name].dtype) for name in params}
  step = state.step + 1
  decay = jnp.minimum(config.optim.ema_decay, (1.0 + step) / (10.0 + step))
  new_ema = {name: decay * ema[name] + (1.0 - decay) * new_params[name] for name in ema}
  grad_norm = optax.tree.norm(grads)
  # One global norm catches any NaN/Inf gradient (per-leaf isfinite reductions made XLA's CPU compile 5x slower).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # A non-finite step only advances the counter.
  new_params, new_ema, opt_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o),
                                                          (new_params, new_ema, opt_state),
                                                          (params, ema, state.opt_state))
  updated = TrainState(step=step, params=optimizer.unpack(new_params, state.params), opt_state=opt_state,
                       ema_params=optimizer.unpack(new_ema, state.ema_params))
  return updated, {**metrics, 'grad_norm': grad_norm, 'finite': finite.astype(jnp.float32)}


def check_finite(fetched: list[dict], step: int, phase_name: str, config: ml_collections.ConfigDict,
                 manager) -> list[dict]:
  """The non-finite policy over the fetched metrics of the steps up to `step`: `stop` raises NonFiniteError
  (after the last good checkpoint has finished writing), `skip` logs each skipped step."""
  first = step - len(fetched) + 1
  for offset, metrics in enumerate(fetched):
    if float(metrics['finite']) == 0.0:
      bad = first + offset
      if config.train.nonfinite == 'stop':
        checkpointing.wait_until_finished(manager)
        raise NonFiniteError(
            f'{phase_name}: non-finite loss or gradient at step {bad}: training stopped; the latest '
            f'checkpoint ({manager.latest_step()}) is the last good one. Set config.train.nonfinite=skip '
            'to skip such steps')
      logging.warning('%s: skipped step %d: non-finite loss or gradient', phase_name, bad)
  return fetched


def train_step(state: TrainState, batch: dict, base_rng: jax.Array, schedule: jax.Array, *, model, optimizer,
               process: diffusion.StagedDiffusion, config: ml_collections.ConfigDict):
  """One diffusion optimiser step on a (sharded) global batch; `schedule`: `schedule_args(config)`."""
  rng = jax.random.fold_in(base_rng, state.step)
  loss_rng, dropout_rng = jax.random.split(rng)

  def loss_fn(params):
    conditioning = model.apply(params, batch['image'], train=True, method=model.encode)  # once per step

    def predict(x_t, t, stage_id, self_cond):
      return model.apply(params, conditioning, x_t, t, stage_id, self_cond, train=True,
                         rngs={'dropout': dropout_rng}, method=model.denoise)
    return losses.staged_loss(predict, batch['mask'], loss_rng, process,
                              timestep_sampling=config.diffusion.timestep_sampling,
                              aux_weight=config.loss.aux_weight, aux_max_t=config.loss.aux_max_t,
                              self_condition=config.model.self_condition, recycling=config.train.recycling)

  return apply_gradients(state, jax.value_and_grad(loss_fn, has_aux=True)(state.params), optimizer, config,
                         schedule)
