"""Skin lesions in dermoscopy: ISIC 2018 task 1 when it is built, else PH².

Full scale (256 px) by default; `:cpu` for a 2-core CPU; `:smoke` for seconds. Build the data first:
`python -m data_prep.build isic2018 --manual_dir=<ISIC2018 folder>` or
`python -m data_prep.build ph2 --manual_dir=../shared/data/ph2`.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.base_config()
  default.apply_full_scale(config)
  config.data.datasets = 'isic2018' if default.is_built('isic2018', config.data.data_dir) else 'ph2'
  return default.apply_arguments(config, arg)

