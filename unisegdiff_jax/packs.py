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
`case_id` unicode [N]. With `--image_format=jpeg` the images are JPEG files instead (quality 95; lossy, about
ten times smaller: a 256 px Kvasir-SEG pack fits beside the wheels in a 64 MiB transfer): `image_jpeg` uint8
and `image_offsets` int64 [N + 1] replace `image`.
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


def _encoded(arrays, **save_args) -> tuple[np.ndarray, np.ndarray]:
  """(all files concatenated, offsets [N + 1]) of the arrays saved with PIL."""
  files = []
  for array in arrays:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, **save_args)
    files.append(np.frombuffer(buffer.getvalue(), np.uint8))
  return np.concatenate(files), np.cumsum([0] + [len(f) for f in files]).astype(np.int64)


def write_pack(path: str, records, image_size: int, image_format: str = 'raw') -> int:
  """Writes records (dicts with native `image`, `mask` [H, W, 1] in {0, 1}, `case_id`) to one pack."""
  if image_format not in ('raw', 'jpeg'):
    raise PackError(f"image_format='{image_format}': use raw or jpeg")
  images, masks, ids = [], [], []
  for record in records:
    images.append(resize_record_image(record['image'], image_size))
    masks.append((np.asarray(record['mask'])[..., 0] > 0).astype(np.uint8))
    case_id = record['case_id']
    ids.append(case_id.decode() if isinstance(case_id, bytes) else str(case_id))
  if not ids:
    raise PackError(f'no cases to write to {path}')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pngs, offsets = _encoded(masks, format='PNG')
  tmp = path + '.tmp.npz'
  if image_format == 'jpeg':
    jpegs, image_offsets = _encoded(images, format='JPEG', quality=95)
    image_fields = {'image_jpeg': jpegs, 'image_offsets': image_offsets}
  else:
    image_fields = {'image': np.stack(images)}
  np.savez_compressed(tmp, **image_fields, mask_png=pngs, mask_offsets=offsets,
                      case_id=np.asarray(ids))
  os.replace(tmp, path)
  return len(ids)


class PackSource:
  """Random access to one pack: {'image': uint8 [S, S, 3], 'mask': uint8 [H, W, 1] native, 'case_id'}."""

  def __init__(self, path: str, image_size: int):
    with np.load(path) as data:
      self._images = data['image'] if 'image' in data else None
      self._jpeg = data['image_jpeg'] if 'image_jpeg' in data else None
      self._image_offsets = data['image_offsets'] if 'image_offsets' in data else None
      self._png = data['mask_png']
      self._offsets = data['mask_offsets']
      self._ids = data['case_id']
    stored = self._images.shape[1] if self._images is not None else self._image(0).shape[1]
    if stored != image_size:
      raise PackError(f'pack {path} holds {stored} px images but config.data.image_size='
                       f'{image_size}: rebuild it with python -m unisegdiff_jax.packs --image_size={image_size}')

  def __len__(self) -> int:
    return len(self._ids)

  def _image(self, index: int) -> np.ndarray:
    if self._images is not None:
      return self._images[index]
    jpeg = self._jpeg[self._image_offsets[index]:self._image_offsets[index + 1]].tobytes()
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert('RGB'), np.uint8)

  def __getitem__(self, index: int) -> dict:
    png = self._png[self._offsets[index]:self._offsets[index + 1]].tobytes()
    mask = np.asarray(Image.open(io.BytesIO(png)), np.uint8)[..., None]
    return {'image': self._image(index), 'mask': mask, 'case_id': str(self._ids[index])}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--datasets', required=True, help='comma-separated dataset names (built with TFDS)')
  parser.add_argument('--splits', default='train,val,test')
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--out', required=True, help='the pack directory')
  parser.add_argument('--image_format', default='raw', choices=('raw', 'jpeg'),
                      help='raw arrays (exact) or JPEG quality 95 (about ten times smaller)')
  parser.add_argument('--max_examples', type=int, default=0, help='> 0: at most this many cases per split')
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
      count = len(source) if args.max_examples <= 0 else min(args.max_examples, len(source))
      count = write_pack(path, (source[i] for i in range(count)), args.image_size, args.image_format)
      print(f'{name} {split}: {count} cases -> {path} ({os.path.getsize(path) / 1e6:.1f} MB)', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
