"""Resized data packs: one `.npz` per dataset split, read with numpy and Pillow alone (no TensorFlow, TFDS or
ArrayRecord), for machines that have JAX but not the data stack (a lent GPU, a quick copy to a cluster).

A pack holds what the pipeline would compute anyway: every image resized once to `image_size` (bilinear,
exactly as `input_pipeline.ResizedSource` does) and every mask at its NATIVE resolution (PNG-compressed),
so training, evaluation at native resolution and the per-case results are the same as from the TFDS source
(only the shuffled record order of the TFDS files is not kept).

    python -m unisegdiff_jax.packs --datasets=kvasir_seg,busi --image_size=64 --out=packs
    python main.py --config=configs/polyp.py:cpu --config.data.pack_dir=packs --workdir=...

Layout: `<pack_dir>/<name>/<split>.npz` ('/' in a name becomes '__': synthetic_lesions__eval1k) with
`image` uint8 [N, S, S, 3], `mask_png` uint8 (all PNGs concatenated), `mask_offsets` int64 [N + 1],
`case_id` unicode [N].
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
from PIL import Image


class PackError(ValueError):
  """A missing or mismatched pack; the message is one line with the command that makes it."""


def pack_path(pack_dir: str, name: str, split: str) -> str:
  return os.path.join(pack_dir, name.replace('/', '__'), f'{split}.npz')


def resize_record_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3], bilinear (the resize every input path uses)."""
  return np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((size, size), Image.BILINEAR))


def write_pack(path: str, records, image_size: int) -> int:
  """Writes records (dicts with native `image`, `mask` [H, W, 1] in {0, 1}, `case_id`) to one pack."""
  images, pngs, ids = [], [], []
  for record in records:
    images.append(resize_record_image(record['image'], image_size))
    buffer = io.BytesIO()
    Image.fromarray((np.asarray(record['mask'])[..., 0] > 0).astype(np.uint8)).save(buffer, format='PNG')
    pngs.append(np.frombuffer(buffer.getvalue(), np.uint8))
    case_id = record['case_id']
    ids.append(case_id.decode() if isinstance(case_id, bytes) else str(case_id))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  offsets = np.cumsum([0] + [len(p) for p in pngs]).astype(np.int64)
  tmp = path + '.tmp.npz'
  np.savez_compressed(tmp, image=np.stack(images), mask_png=np.concatenate(pngs), mask_offsets=offsets,
                      case_id=np.asarray(ids))
  os.replace(tmp, path)
  return len(ids)


class PackSource:
  """Random access to one pack: {'image': uint8 [S, S, 3], 'mask': uint8 [H, W, 1] native, 'case_id'}."""

  def __init__(self, path: str, image_size: int):
    with np.load(path) as data:
      self._images = data['image']
      self._png = data['mask_png']
      self._offsets = data['mask_offsets']
      self._ids = data['case_id']
    if self._images.shape[1] != image_size:
      raise PackError(f'pack {path} holds {self._images.shape[1]} px images but config.data.image_size='
                       f'{image_size}: rebuild it with python -m unisegdiff_jax.packs --image_size={image_size}')

  def __len__(self) -> int:
    return len(self._ids)

  def __getitem__(self, index: int) -> dict:
    png = self._png[self._offsets[index]:self._offsets[index + 1]].tobytes()
    mask = np.asarray(Image.open(io.BytesIO(png)), np.uint8)[..., None]
    return {'image': self._images[index], 'mask': mask, 'case_id': str(self._ids[index])}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--datasets', required=True, help='comma-separated dataset names (built with TFDS)')
  parser.add_argument('--splits', default='train,val,test')
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--out', required=True, help='the pack directory')
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR',
                                                           os.path.expanduser('~/tensorflow_datasets')))
  args = parser.parse_args(argv)
  import data_prep  # pylint: disable=g-import-not-at-top  (TFDS: only where the packs are made)
  for name in [n.strip() for n in args.datasets.split(',') if n.strip()]:
    for split in args.splits.split(','):
      try:
        source = data_prep.ensure_built(name, args.data_dir).as_data_source(split=split)
      except (data_prep.DatasetNotBuiltError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
      path = pack_path(args.out, name, split)
      count = write_pack(path, (source[i] for i in range(len(source))), args.image_size)
      print(f'{name} {split}: {count} cases -> {path} ({os.path.getsize(path) / 1e6:.1f} MB)', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
