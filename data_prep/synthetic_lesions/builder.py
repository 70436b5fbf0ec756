"""TFDS builder of `synthetic_lesions` (configs `default`: 1200/100/200, `eval1k`: 1200/200/1000 for the
experiment runner's paired statistics, `tiny`: 32/8/8)."""
from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds
from tqdm import tqdm

from data_prep.base import FILE_FORMAT, CodePathMixin, encode_png, features
from data_prep.synthetic_lesions.generate import generate_example, split_seed


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  num_train: int = 1200
  num_val: int = 100
  num_test: int = 200


class SyntheticLesions(CodePathMixin, tfds.core.GeneratorBasedBuilder):
  """Procedural lesions (dermoscopy / ultrasound / endoscopy look), deterministic per split+index."""

  name = 'synthetic_lesions'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      SyntheticConfig(name='default', description='train 1200 / val 100 / test 200'),
      SyntheticConfig(name='eval1k', description='train 1200 / val 200 / test 1000 (experiments)',
                      num_val=200, num_test=1000),
      SyntheticConfig(name='tiny', description='train 32 / val 8 / test 8 (tests)',
                      num_train=32, num_val=8, num_test=8),
  ]

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', FILE_FORMAT)
    super().__init__(**kwargs)
    self.show_progress = False

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=features('png'),
                                          supervised_keys=('image', 'mask'))

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    return {'train': self._generate_examples('train', cfg.num_train),
            'val': self._generate_examples('val', cfg.num_val),
            'test': self._generate_examples('test', cfg.num_test)}

  def _generate_examples(self, split: str, n: int):
    for i in tqdm(range(n), desc=f'{self.name} {split}', unit='ex', disable=not self.show_progress):
      ex = generate_example(split_seed(split, i))
      case_id = f'{split}_{i:05d}'
      yield case_id, {
          'image': encode_png(ex['image']),
          'mask': encode_png(ex['mask'][..., None]),
          'case_id': case_id,
          'dataset': 'synthetic_lesions',
          'organ': ex['organ'],
          'modality': ex['modality'],
      }
