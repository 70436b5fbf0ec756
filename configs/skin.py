"""Skin lesions in dermoscopy: ISIC 2018 task 1 when it is built, else PH².

Full scale (256 px) by default; `:cpu` for a 2-core CPU; `:smoke` for seconds. Build the data first:
`python -m data_prep.build isic2018 --manual_dir=<ISIC2018 folder>` or
`python -m data_prep.build ph2 --manual_dir=../shared/data/ph2`.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.base_config()
  default.apply_full_scale(config)
  config.data.datasets = 'isic2018' if _is_built('isic2018', config.data.data_dir) else 'ph2'
  return default.apply_arguments(config, arg)


def _is_built(name: str, data_dir: str) -> bool:
  try:
    import data_prep  # pylint: disable=g-import-not-at-top
    return data_prep.is_built(name, data_dir)
  except Exception:  # pylint: disable=broad-except
    return False
