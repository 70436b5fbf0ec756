"""Skin lesions in dermoscopy: PH² (the set in ../shared/data).

The dataset is fixed (nothing is probed on disk). ISIC 2018 task 1, when you have it, is one override away:
`python -m data_prep.build isic2018 --manual_dir=<ISIC2018 folder>`, then
`--config.data.datasets=isic2018`. Build PH² with `python -m data_prep.build ph2`.

Full scale (256 px) by default; `:cpu` for a 2-core CPU; `:smoke` for seconds.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.base_config()
  default.apply_full_scale(config)
  config.data.datasets = 'ph2'
  return default.apply_arguments(config, arg)
