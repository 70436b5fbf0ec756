"""Grain pipelines over TFDS ArrayRecord data sources: decode, resize, augment, mix datasets, batch, shard.

With `config.data.pack_dir` set, the sources are resized packs (`unisegdiff_jax.packs`) instead: numpy files
that need neither TensorFlow nor TFDS.

Records (see data_prep) hold `image` [H, W, 3] uint8 at native resolution, `mask` [H, W, 1] uint8 in {0, 1},
`case_id`, `dataset`, `organ`, `modality`. Training batches hold `image` [b, S, S, 3] float32 in [-1, 1] and
`mask` [b, S, S, 1] float32 in {0, 1}, b = global batch / process count (each JAX process reads its own
shard of every dataset).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from unisegdiff_jax import packs


def dataset_names(data_config: ml_collections.ConfigDict) -> list[str]:
  names = [n.strip() for n in data_config.datasets.split(',') if n.strip()]
  if not names:
    raise ValueError('config.data.datasets is empty: name at least one dataset')
  return names


def display_name(name: str) -> str:
  """'synthetic_lesions/tiny' -> 'synthetic_lesions' (the name used in summaries)."""
  return name.split('/')[0]


def mixture_weights(data_config: ml_collections.ConfigDict) -> list[float]:
  names = dataset_names(data_config)
  text = data_config.mixture_weights.strip()
  if not text:
    return [1.0 / len(names)] * len(names)
  try:
    weights = [float(w) for w in text.split(',')]
  except ValueError:
    raise ValueError(f"config.data.mixture_weights='{text}' is not a comma-separated list of numbers") from None
  if len(weights) != len(names) or any(w < 0 for w in weights) or sum(weights) <= 0:
    raise ValueError(f'config.data.mixture_weights needs {len(names)} non-negative weights (one per dataset '
                     f'in config.data.datasets), got {text!r}')
  return [w / sum(weights) for w in weights]


def load_source(name: str, split: str, data_config: ml_collections.ConfigDict):
  """One dataset split: the pack in `data_config.pack_dir` when set, else the TFDS ArrayRecord data source
  (building the synthetic set on first use)."""
  if data_config.get('pack_dir'):
    path = packs.pack_path(data_config.pack_dir, name, split)
    if not os.path.exists(path):
      raise packs.PackError(f"no pack for dataset '{name}' split '{split}' at {path}: make it with "
                       f'python -m unisegdiff_jax.packs --datasets={name} --image_size={data_config.image_size} '
                       f'--out={data_config.pack_dir}')
    return packs.PackSource(path, data_config.image_size)
  import data_prep  # pylint: disable=g-import-not-at-top  (TFDS)
  builder = data_prep.ensure_built(name, data_config.data_dir)
  if split not in builder.info.splits:
    raise ValueError(f"dataset '{name}' has no split '{split}' (it has: {', '.join(builder.info.splits)})")
  return builder.as_data_source(split=split)


def _text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray):
    return _text(value.item())
  return str(value)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [size, size, 3] in [-1, 1] (bilinear)."""
  resized = Image.fromarray(image).resize((size, size), Image.BILINEAR)
  return np.asarray(resized, np.float32) / 127.5 - 1.0


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """{0,1} [H, W, 1] -> float32 [size, size, 1] (nearest)."""
  resized = Image.fromarray(mask[..., 0].astype(np.uint8)).resize((size, size), Image.NEAREST)
  return np.asarray(resized, np.float32)[..., None]


class ResizedSource:
  """A random-access source that decodes and resizes each record once, then serves it from memory.

  Real photographs are decoded at up to 1920 x 1072 px; re-decoding them every epoch would cost more CPU
  than the training step at 64-96 px. Only the resized image and mask are kept (S x S x 4 bytes each).
  """

  def __init__(self, source, image_size: int):
    self._source = source
    self._size = image_size
    self._cache: dict[int, dict] = {}

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = self._cache.get(index)
    if record is None:
      raw = self._source[index]
      size = (self._size, self._size)
      image = Image.fromarray(np.asarray(raw['image'], np.uint8)).resize(size, Image.BILINEAR)
      mask = Image.fromarray(np.asarray(raw['mask'], np.uint8)[..., 0]).resize(size, Image.NEAREST)
      record = {'image': np.asarray(image), 'mask': np.asarray(mask)[..., None]}
      self._cache[index] = record
    return record


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
  """Resize, random flips and a small random rotation (same geometry for image and mask)."""
  image_size: int
  augment: bool
  max_rotation_degrees: float

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    image = Image.fromarray(np.asarray(record['image'], np.uint8))
    mask = Image.fromarray(np.asarray(record['mask'], np.uint8)[..., 0])
    size = (self.image_size, self.image_size)
    if image.size != size:
      image, mask = image.resize(size, Image.BILINEAR), mask.resize(size, Image.NEAREST)
    if self.augment:
      if rng.random() < 0.5:
        image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
      if rng.random() < 0.5:
        image, mask = image.transpose(Image.FLIP_TOP_BOTTOM), mask.transpose(Image.FLIP_TOP_BOTTOM)
      if self.max_rotation_degrees > 0:
        angle = float(rng.uniform(-self.max_rotation_degrees, self.max_rotation_degrees))
        image = image.rotate(angle, Image.BILINEAR, fillcolor=(0, 0, 0))
        mask = mask.rotate(angle, Image.NEAREST, fillcolor=0)
    return {
        'image': np.asarray(image, np.float32) / 127.5 - 1.0,
        'mask': np.asarray(mask, np.float32)[..., None],
    }


def mixed_dataset(sources: Sequence[Any], weights: Sequence[float], seed: int) -> grain.MapDataset:
  """Every source shuffled and repeated forever, mixed by `weights` (the global example stream)."""
  per_dataset = []
  for index, source in enumerate(sources):
    ds = grain.MapDataset.source(source)
    per_dataset.append(ds.shuffle(seed=seed + 1000 * index).repeat())
  return per_dataset[0] if len(per_dataset) == 1 else grain.MapDataset.mix(per_dataset, list(weights))


def create_train_iterator(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                          process_count: int | None = None) -> grain.DatasetIterator:
  """An infinite, checkpointable iterator of this process's rows of the global training batches.

  The global stream (mix, shuffle, augmentation seeded per example) does not depend on the process count;
  process p reads, decodes and augments only rows [p*b, (p+1)*b) of each global batch (b = batch / count),
  so 1 and N processes train on the same global batches.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  data = config.data
  global_batch = config.train.global_batch_size
  if global_batch % process_count:
    raise ValueError(f'config.train.global_batch_size={global_batch} is not divisible by the '
                     f'{process_count} JAX processes')
  sources = []
  for name in dataset_names(data):
    source = load_source(name, data.train_split, data)
    sources.append(ResizedSource(source, data.image_size) if data.cache_resized else source)
  ds = mixed_dataset(sources, mixture_weights(data), config.seed)
  ds = ds.random_map(TrainTransform(data.image_size, data.augment, data.max_rotation_degrees),
                     seed=config.seed)
  # Local batch j of process p is global batch j's rows for p; only those examples are ever materialised.
  ds = ds.batch(global_batch // process_count, drop_remainder=True)[process_index::process_count]
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  if data.worker_count > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
  return iter(iter_ds)


@dataclasses.dataclass
class EvalCase:
  """One evaluation image: the network input and the native-resolution truth."""
  dataset: str
  case_id: str
  image: np.ndarray  # uint8 [H, W, 3] native
  mask: np.ndarray  # bool [H, W] native


def eval_cases(config: ml_collections.ConfigDict, split: str, max_examples: int = 0
               ) -> dict[str, list[EvalCase]]:
  """Evaluation cases per dataset, in a fixed order; every process loads all of them (the inference engine
  feeds each process's rows of every batch and gathers the results on all processes)."""
  out = {}
  for name in dataset_names(config.data):
    source = load_source(name, split, config.data)
    count = len(source) if not max_examples else min(max_examples, len(source))
    cases = []
    for i in range(count):
      record = source[i]
      cases.append(EvalCase(
          dataset=display_name(name), case_id=_text(record['case_id']),
          image=np.asarray(record['image'], np.uint8),
          mask=np.asarray(record['mask'])[..., 0] > 0))
    out[display_name(name)] = cases
  return out


def batched(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
  for start in range(0, len(items), batch_size):
    yield items[start:start + batch_size]
