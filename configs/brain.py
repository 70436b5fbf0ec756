"""Lower-grade glioma in brain MRI: LGG (FLAIR-abnormality masks, split by patient).

Full scale (256 px, accelerator widths) by default; `:cpu` trains both phases on a 2-core CPU in about
30 minutes; `:smoke` shrinks everything to seconds. Build the data first:
`python -m data_prep.build lgg_brain_mri --manual_dir=../shared/data/lgg_brain_mri`.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.base_config()
  default.apply_full_scale(config)
  config.data.datasets = 'lgg_brain_mri'
  return default.apply_arguments(config, arg)
