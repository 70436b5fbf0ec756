"""One model across organs and modalities: every real dataset that is built (Kvasir-SEG, PH², BUSI,
ISIC 2018), mixed with balanced weights so the 200-image PH² is not drowned by the larger sets.

Full scale by default; `:cpu` trains both phases on a 2-core CPU in about 30 minutes; `:smoke` for seconds.
Evaluation reports every dataset separately and their unweighted mean.
"""

from configs import default

CANDIDATES = ('kvasir_seg', 'ph2', 'busi', 'isic2018')
DEFAULT = ('kvasir_seg', 'ph2', 'busi')


def get_config(arg: str | None = None):
  config = default.base_config()
  default.apply_full_scale(config)
  built = [name for name in CANDIDATES if default.is_built(name, config.data.data_dir)]
  config.data.datasets = ','.join(built or DEFAULT)  # unbuilt: the run stops naming the build command
  return default.apply_arguments(config, arg)

