"""Breast masses in B-mode ultrasound: BUSI.

Full scale (256 px, accelerator widths) by default; `:cpu` trains both phases on a 2-core CPU in about
30 minutes; `:smoke` shrinks everything to seconds. Build the data first:
`python -m data_prep.build busi --manual_dir=../shared/data/busi`.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.base_config()
  default.apply_full_scale(config)
  config.data.datasets = 'busi'
  return default.apply_arguments(config, arg)
