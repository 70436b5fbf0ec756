"""Thyroid nodules in B-mode ultrasound: DDTI (preprocessed 300x300 crops, split by case).

Full scale (256 px, accelerator widths) by default; `:cpu` trains both phases on a 2-core CPU in about
30 minutes; `:smoke` shrinks everything to seconds. Build the data first:
`python -m data_prep.build ddti_thyroid_us --manual_dir=../shared/data/ddti_thyroid_us`.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.base_config()
  default.apply_full_scale(config)
  config.data.datasets = 'ddti_thyroid_us'
  return default.apply_arguments(config, arg)
