"""unisegdiff_jax entry point: `python main.py --config=configs/synthetic.py --workdir=runs/synthetic`.

Modes: train (then a final test evaluation), eval (a checkpoint on a split), predict (segment image files:
--input=FILE_OR_FOLDER --output=DIR), sweep (Dice against sampling budget: --sweep=staged,ddim:10,ddpm:50
--ensemble_sizes=1,3).
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and evaluation outputs.')
flags.DEFINE_enum('mode', 'train', ['train', 'pretrain', 'eval', 'predict', 'sweep'],
                  'train: train then evaluate on the test split; pretrain: phase 0 (the segmenter) only, then its '
                  'test evaluation; eval: evaluate a checkpoint; predict: segment image files; sweep: evaluate a '
                  'checkpoint with several samplers, budgets and ensemble sizes.')
flags.DEFINE_integer('checkpoint_step', None,
                     'eval/predict/sweep: the checkpoint step (default: best by validation Dice).')
flags.DEFINE_string('split', None, 'eval/sweep: the split to evaluate (default: config.data.test_split).')
flags.DEFINE_string('input', None, 'predict: an image file or a folder of images.')
flags.DEFINE_string('output', None, 'predict: the folder for the masks, probabilities, uncertainty and overlays; '
                    'eval: the folder for summary.json and per_case.csv (default WORKDIR/eval/SPLIT).')
flags.DEFINE_string('sweep', 'staged,ddim:5,ddim:10,ddim:25,ddim:100,ddpm:50',
                    'sweep: comma-separated samplers with budgets (staged, ddim:N, ddpm:N).')
flags.DEFINE_string('ensemble_sizes', '1', 'sweep: comma-separated ensemble sizes, e.g. 1,3,5.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file (file.py or file.py:args).',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def _setup_runtime() -> None:
  """Multi-host init, TensorFlow off accelerators, persistent compilation cache."""
  import jax  # pylint: disable=g-import-not-at-top
  if 'JAX_NUM_PROCESSES' in os.environ:  # explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU collectives (only CPU uses them)
    jax.distributed.initialize(os.environ['JAX_COORDINATOR_ADDRESS'], int(os.environ['JAX_NUM_PROCESSES']),
                               int(os.environ['JAX_PROCESS_ID']))
  elif any(k in os.environ for k in ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS', 'TPU_WORKER_HOSTNAMES',
                                     'MEGASCALE_COORDINATOR_ADDRESS')):
    jax.distributed.initialize()  # cluster auto-detection (Slurm, Cloud TPU, GKE)
  from unisegdiff_jax import host  # pylint: disable=g-import-not-at-top
  host.keep_tensorflow_off_accelerators()
  host.use_compilation_cache()


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter from orbax, grain and tfds (warnings and errors still pass)."""
  _NOISY = ('/orbax/', '/grain/', '/tensorflow_datasets/', '/jax/_src/')

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(p in record.pathname for p in self._NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from unisegdiff_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    _setup_runtime()
    from unisegdiff_jax import train  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    logging.info('JAX process %d / %d, local devices: %s', jax.process_index(), jax.process_count(),
                 jax.local_devices())
    if FLAGS.mode in ('train', 'pretrain'):
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir, pretrain_only=FLAGS.mode == 'pretrain')
    elif FLAGS.mode == 'predict':
      if not FLAGS.input or not FLAGS.output:
        raise app.UsageError('--mode=predict needs --input=FILE_OR_FOLDER and --output=DIR')
      from unisegdiff_jax import predict  # pylint: disable=g-import-not-at-top
      sys.exit(predict.run_predict(FLAGS.config, FLAGS.workdir, FLAGS.input, FLAGS.output,
                                   checkpoint_step=FLAGS.checkpoint_step))
    elif FLAGS.mode == 'sweep':
      from unisegdiff_jax import sweep  # pylint: disable=g-import-not-at-top
      sweep.run_sweep(FLAGS.config, FLAGS.workdir, spec=FLAGS.sweep, ensemble_sizes=FLAGS.ensemble_sizes,
                      checkpoint_step=FLAGS.checkpoint_step, split=FLAGS.split)
    else:
      train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, checkpoint_step=FLAGS.checkpoint_step,
                                split=FLAGS.split, out_dir=FLAGS.output)
  except errors.USER_ERRORS as err:
    print(f'error: {err}', file=sys.stderr)
    sys.exit(1)


def _parse_flags(argv):
  """absl's flag parsing, with config errors (unknown keys, bad values) as one line instead of a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as err:
    message = str(err)
    if 'Traceback' in message:  # an exception raised inside a config file: keep its last line
      message = message.split(':', 1)[0] + ': ' + message.strip().splitlines()[-1].split('Error: ', 1)[-1]
  except (KeyError, AttributeError, TypeError, ValueError) as err:
    detail = str(err.args[0] if err.args else err).replace('\\n', ' ').replace('\\', '').replace("'", '')
    message = f'bad config override: {detail}'
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(1)


if __name__ == '__main__':
  std_logging.getLogger('absl').addFilter(_QuietLibraries())
  app.run(main, flags_parser=_parse_flags)
