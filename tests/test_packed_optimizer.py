"""The optimiser step on packed parameters (one vector per group) against optax applied leaf by leaf."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import synthetic
from unisegdiff_jax import schedules
from unisegdiff_jax import train_state

SHAPES = {'params': {'decoder': {'kernel': (3, 3, 2, 4), 'bias': (4,)},
                     'encoder': {'conv': {'kernel': (3, 3, 3, 2)}, 'scale': (2,)},
                     'denoiser': {'kernel': (5, 2), 'bias': (2,)}}}


def _tree(seed, scale=1.0):
  rs = np.random.RandomState(seed)
  return jax.tree_util.tree_map(lambda shape: jnp.asarray(scale * rs.randn(*shape), jnp.float32), SHAPES,
                                is_leaf=lambda x: isinstance(x, tuple))


def _reference_optimizer(config, pretrained_names):
  """The update leaf by leaf: optax's clip + AdamW, multi_transform over the pre-trained subtrees."""
  adamw = optax.adamw(schedules.unit_rate, weight_decay=config.optim.weight_decay)
  if pretrained_names:
    pretrained = (optax.set_to_zero() if config.pretrain.encoder_mode == 'frozen' else
                  optax.chain(optax.adamw(schedules.unit_rate, weight_decay=config.optim.weight_decay),
                              optax.scale(config.pretrain.finetune_lr_multiplier)))
    labels = {'params': {name: jax.tree_util.tree_map(
        lambda _, n=name: 'pretrained' if n in pretrained_names else 'train', sub,
        is_leaf=lambda x: isinstance(x, tuple)) for name, sub in SHAPES['params'].items()}}
    adamw = optax.multi_transform({'train': adamw, 'pretrained': pretrained}, labels)
  return optax.chain(optax.clip_by_global_norm(config.optim.grad_clip_norm), adamw)


@pytest.mark.parametrize('mode,names', [('scratch', ()), ('frozen', ('encoder',)),
                                        ('finetune', ('encoder', 'decoder'))])
def test_packed_step_is_optax_leaf_by_leaf(mode, names):
  config = synthetic.get_config('smoke')
  config.optim.grad_clip_norm = 3.0  # the gradients below have norms about 6: clipping is active
  config.optim.weight_decay = 0.1
  config.optim.ema_decay = 0.9
  config.pretrain.encoder_mode = 'frozen' if mode == 'frozen' else 'finetune'
  config.pretrain.finetune_lr_multiplier = 0.25
  schedule = jnp.asarray(schedules.schedule_args(0.05, 2, 6))
  optimizer = train_state.make_optimizer(config, pretrained_names=names)
  state = train_state.new_state(_tree(0), optimizer)
  reference = _reference_optimizer(config, names)
  ref_params, ref_ema, ref_opt = _tree(0), _tree(0), reference.init(_tree(0))
  apply = jax.jit(lambda s, g: train_state.apply_gradients(s, ((jnp.float32(1.0), {}), g), optimizer, config,
                                                           schedule))
  for k in range(6):
    grads = _tree(10 + k)
    state, metrics = apply(state, grads)
    updates, ref_opt = reference.update(grads, ref_opt, ref_params)
    rate = schedules.learning_rate(k, schedule)
    ref_params = jax.tree_util.tree_map(lambda p, u: p + rate * u, ref_params, updates)
    decay = min(config.optim.ema_decay, (2.0 + k) / (11.0 + k))
    ref_ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ref_ema, ref_params)
    np.testing.assert_allclose(float(metrics['grad_norm']), float(optax.tree.norm(grads)), rtol=1e-6)
  assert jax.tree_util.tree_structure(state.params) == jax.tree_util.tree_structure(ref_params)
  for got, want in zip(jax.tree_util.tree_leaves((state.params, state.ema_params)),
                       jax.tree_util.tree_leaves((ref_params, ref_ema))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  if mode == 'frozen':
    for got, start in zip(jax.tree_util.tree_leaves(state.params['params']['encoder']),
                          jax.tree_util.tree_leaves(_tree(0)['params']['encoder'])):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(start))
  # The optimiser state holds counters and one vector per group and moment, no per-leaf arrays.
  packed = optimizer.pack(state.params)
  assert set(packed) == {'train'} | ({'pretrained'} if names else set())
  vectors = [leaf for leaf in jax.tree_util.tree_leaves(state.opt_state) if leaf.ndim]
  assert {leaf.shape for leaf in vectors} <= {vector.shape for vector in packed.values()}
  assert len(vectors) == 2 * (len(packed) - (mode == 'frozen'))  # Adam's two moments per trained group


def test_pack_unpack_round_trip_and_group_order():
  optimizer = train_state.PackedOptimizer(optax.identity(), ('encoder',))
  tree = _tree(3)
  packed = optimizer.pack(tree)
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  encoder = [np.ravel(v) for p, v in leaves if p[1].key == 'encoder']
  others = [np.ravel(v) for p, v in leaves if p[1].key != 'encoder']
  np.testing.assert_array_equal(packed['pretrained'], np.concatenate(encoder))
  np.testing.assert_array_equal(packed['train'], np.concatenate(others))
  back = optimizer.unpack(packed, tree)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
  for got, want in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
    np.testing.assert_array_equal(got, want)


def test_a_group_of_mixed_dtypes_is_refused():
  tree = {'params': {'a': jnp.zeros((2,), jnp.float32), 'b': jnp.zeros((2,), jnp.bfloat16)}}
  with pytest.raises(ValueError, match="parameter group 'train' mixes dtypes"):
    train_state.PackedOptimizer(optax.identity()).pack(tree)


def test_a_nonfinite_gradient_changes_nothing_but_the_step():
  config = synthetic.get_config('smoke')
  optimizer = train_state.make_optimizer(config, pretrained_names=('encoder',))
  state = train_state.new_state(_tree(0), optimizer)
  schedule = jnp.asarray(schedules.schedule_args(0.05, 0, 4))
  state, _ = train_state.apply_gradients(state, ((jnp.float32(1.0), {}), _tree(1)), optimizer, config, schedule)
  grads = jax.tree_util.tree_map(lambda g: g.at[0].set(jnp.nan) if g.ndim == 1 else g, _tree(2))
  after, metrics = train_state.apply_gradients(state, ((jnp.float32(1.0), {}), grads), optimizer, config, schedule)
  assert float(metrics['finite']) == 0.0 and int(after.step) == int(state.step) + 1
  for got, want in zip(jax.tree_util.tree_leaves((after.params, after.ema_params, after.opt_state)),
                       jax.tree_util.tree_leaves((state.params, state.ema_params, state.opt_state))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
