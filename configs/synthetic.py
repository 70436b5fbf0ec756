"""The embedded procedural dataset: the project's end-to-end check on any machine.

`python main.py --config=configs/synthetic.py --workdir=runs/synthetic` trains on a 2-core CPU in under
15 minutes; `:smoke` shrinks it to seconds (and uses the tiny build of the dataset).
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.base_config()
  config.data.datasets = 'synthetic_lesions'
  # Sized for the ~15-minute budget on a 2-core CPU (1.4M parameters at 64 px).
  default.apply_cpu(config)
  config.pretrain.num_steps = 300
  config.pretrain.eval_every_steps = 300
  # 350 phase-1 steps: the train step runs at 0.9-1.4 steps/s on the 2-core CPU (measured on different days);
  # 500 steps made the README's main command take 14 min 55 s on a slow day (2026-11-26), 1000 about 20 minutes.
  # The experiments pin their own step counts (sweeps.py).
  config.train.num_steps = 350
  config.train.eval_every_steps = 175
  config.train.checkpoint_every_steps = 175
  if 'smoke' in default.tokens(arg):
    config.data.datasets = 'synthetic_lesions/tiny'
  return default.apply_arguments(config, arg)
