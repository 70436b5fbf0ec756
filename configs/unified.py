"""One model across organs and modalities: the five real sets Kvasir-SEG (colon), PH² (skin), BUSI
(breast), LGG (brain MRI) and DDTI (thyroid ultrasound), mixed with balanced weights so the 200-image PH²
is not drowned by the larger sets.

The list is fixed (nothing is probed on disk): a set that is not built stops the run with one line naming
its build command (`python -m data_prep.build kvasir_seg ph2 busi lgg_brain_mri ddti_thyroid_us`).
ISIC 2018 is not in the default list; add it with
`--config.data.datasets=kvasir_seg,ph2,busi,lgg_brain_mri,ddti_thyroid_us,isic2018` (after
`python -m data_prep.build isic2018 --manual_dir=<ISIC2018 folder>`).

Full scale by default; `:cpu` trains both phases on a 2-core CPU in about 30 minutes; `:smoke` for seconds.
Evaluation reports every dataset separately and their unweighted mean.
"""

from configs import default

DATASETS = ('kvasir_seg', 'ph2', 'busi', 'lgg_brain_mri', 'ddti_thyroid_us')


def get_config(arg: str | None = None):
  config = default.base_config()
  default.apply_full_scale(config)
  config.data.datasets = ','.join(DATASETS)
  return default.apply_arguments(config, arg)
