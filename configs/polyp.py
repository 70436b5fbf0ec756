"""Colon polyps in colonoscopy: Kvasir-SEG.

Full scale (256 px, accelerator widths) by default; `:cpu` trains both phases on a 2-core CPU in about
30 minutes; `:smoke` shrinks everything to seconds. Build the data first:
`python -m data_prep.build kvasir_seg --manual_dir=../shared/data/kvasir_seg`.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.base_config()
  default.apply_full_scale(config)
  config.data.datasets = 'kvasir_seg'
  return default.apply_arguments(config, arg)
