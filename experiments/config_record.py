"""The configuration a run's command line resolves to: recorded in run.json, compared by the results page.

`resolve(command)` parses the `--config=...` and `--config.x=y` arguments of a `main.py` command exactly as
main.py does (ml_collections' config_flags on a private flag registry) and returns the config as a flat
{dotted field: JSON value} dict. A run whose recorded config differs from what the same command resolves to
today is flagged stale by the page; one whose config is unchanged stays current even when configs/ changed
(for example a new default that the arm's own overrides pin).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Paths, which differ between machines and copies of the data but not in what the run computes.
IGNORED = ('data.data_dir', 'data.pack_dir', 'pretrain.checkpoint')
# Fields only phase 1 reads: a phase-0 (segmenter) run is not stale when they change.
PHASE1_ONLY = ('model.denoiser.', 'model.self_condition', 'diffusion.', 'loss.', 'sampling.sampler',
               'sampling.ddim_steps', 'sampling.ddpm_steps', 'sampling.ensemble_size', 'sampling.fusion',
               'optim.learning_rate', 'optim.warmup_steps', 'optim.weight_decay', 'optim.ema_decay',
               'train.num_steps', 'train.recycling', 'train.eval_every_steps', 'train.checkpoint_every_steps',
               'pretrain.encoder_mode', 'pretrain.finetune_lr_multiplier', 'pretrain.coarse_logits')


class ConfigError(ValueError):
  """A command whose config no longer resolves; the message is one line."""


def _absolute(arg: str, repo: str) -> str:
  """`--config=configs/x.py:args` with the file made absolute against `repo` (threads must not chdir)."""
  path, sep, rest = arg[len('--config='):].partition(':')
  return f'--config={os.path.join(repo, path)}{sep}{rest}'


def flatten(tree: Mapping, prefix: str = '') -> dict[str, object]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = json.loads(json.dumps(value))  # tuples -> lists, as run.json stores them
  return out


def resolve(command: Sequence[str], repo: str = REPO) -> dict[str, object]:
  """The flat config of `command` (main.py's arguments; all but the --config ones are ignored)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  if repo not in sys.path:
    sys.path.insert(0, repo)  # config files import `configs.default`
  args = [_absolute(a, repo) if a.startswith('--config=') else a for a in command if a.startswith('--config')]
  if not any(a.startswith('--config=') for a in args):
    raise ConfigError(f'no --config= in {" ".join(command)[:120]}')
  argv, registry = ['resolve', *args], flags.FlagValues()
  try:  # the override flags are registered from sys_argv when the config flag is defined
    config_flags.DEFINE_config_file('config', None, flag_values=registry, lock_config=True, sys_argv=argv)
    registry(argv)
    return flatten(registry.config.to_dict())
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:200]) from e


def differences(recorded: Mapping[str, object], now: Mapping[str, object], phase0: bool = False) -> list[str]:
  """['field: was -> now', ...] over the fields of either, paths (IGNORED) left out, and for a phase-0 run
  the fields only phase 1 reads (PHASE1_ONLY)."""
  fields = sorted(f for f in (set(recorded) | set(now)) - set(IGNORED) if not (phase0 and f.startswith(PHASE1_ONLY)))
  missing = object()
  return [f'{f}: {recorded.get(f, "(absent)")!r} -> {now.get(f, "(absent)")!r}' for f in fields
          if recorded.get(f, missing) != now.get(f, missing)]


SAMPLING = 'sampling.'  # how a trained model is sampled; training reads it only for its validation Dice


def sampler_label(config: Mapping[str, object]) -> str:
  """A flat config's sampler as the budget grid writes it: 'staged', 'ddim:2', 'ddpm:10' ('?' if absent)."""
  sampler = str(config.get('sampling.sampler', '?'))
  steps = config.get(f'sampling.{sampler}_steps') if sampler != 'staged' else None
  return sampler if steps is None else f'{sampler}:{steps}'


def training_differences(a: Mapping[str, object], b: Mapping[str, object]) -> list[str]:
  """differences(a, b) without the sampling fields: empty when both configs train the same model (the
  validation sampler, which picks the best checkpoint, aside)."""
  return [d for d in differences(a, b) if not d.startswith(SAMPLING)]
