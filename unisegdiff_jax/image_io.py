"""Robust image / mask reading for the dataset builders and the predict command.

Pure numpy + Pillow (no jax / tensorflow imports), so it is cheap to import in
data-prep scripts and worker processes.

Public API
----------
``SUPPORTED_EXTENSIONS``  -- ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')
``DEFAULT_MAX_PIXELS``    -- 50_000_000 (width * height refusal limit)
``ImageReadError``        -- ValueError subclass; ``str(err)`` is ONE line
                             ``"<path>: <problem>"`` (attributes ``path``, ``problem``)
``read_image(path, *, max_pixels=DEFAULT_MAX_PIXELS)`` -> HxWx3 uint8 RGB
``read_mask(path, *, max_pixels=DEFAULT_MAX_PIXELS, threshold=None)``
                          -> (HxW uint8 array in {0, 1}, info dict)
``save_png(path, array)`` -- uint8 (or bool) HxW / HxWx3 array -> PNG

Rules
-----
Refusals (all raise ``ImageReadError`` naming the file and the problem):

* file missing, a directory, or unreadable;
* zero-byte file;
* extension not in ``SUPPORTED_EXTENSIONS`` (checked case-insensitively, before
  the file is opened).  The *content* is sniffed by Pillow, so a JPEG stored
  under ``.png`` is accepted;
* content Pillow cannot identify (e.g. a text file named ``x.png``);
* truncated / corrupt data: pixels are fully decoded with ``img.load()`` while
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is forced to ``False``, and any decoder
  error (OSError, SyntaxError, zlib errors, ...) is reported;
* more than ``max_pixels`` pixels (width * height).  The size is read from the
  header right after ``Image.open`` and the image is refused *before* any pixel
  is decoded, so a header claiming 30000x30000 costs nothing.  Pillow's own
  decompression-bomb guard (``DecompressionBombError``) is also caught and
  reported the same way (with our limit in the message).  Pass
  ``max_pixels=None`` to disable our check (Pillow's guard still applies).

Geometry: the EXIF orientation tag is applied (``ImageOps.exif_transpose``), so
the array is what a viewer shows.  Images and masks are treated identically,
so pairs stay aligned.  A malformed EXIF block is ignored (no rotation).
Multi-frame files (multi-page TIFF) use the first frame.  A 1x1 image is fine.

Pixel modes -> 8 bit:

* ``'1'`` -> 0 / 255 grey; ``'L'`` as is; ``'LA'`` / ``'La'`` -> the L channel.
* 16/32-bit integer (``'I;16'``, ``'I;16B'``, ``'I;16L'``, ``'I'``): negative
  values clip to 0; if max <= 255 values are kept (clipped); elif max <= 65535
  the data are 16-bit and are divided by 257 (rounded, 65535 -> 255); else
  (genuine 32-bit range) scaled linearly by ``255 / max``.
* ``'F'`` (float): NaN/inf -> 0, negatives clip to 0; if max <= 1 the data are
  taken as [0, 1] and multiplied by 255; elif max <= 255 kept; else scaled by
  ``255 / max``.  Rounded to nearest.
* ``'RGBA'`` / ``'RGBX'``: alpha is DROPPED (no compositing) -- the stored
  colour of every pixel is kept, even fully transparent ones.
* ``'P'`` / ``'PA'`` (palette): converted to RGB(A) via the palette; any
  transparency is then dropped like RGBA.
* ``'CMYK'``, ``'YCbCr'``, ``'LAB'``, ``'HSV'``, anything else: Pillow
  ``convert('RGB')``.
* ``read_image``: single-channel results are replicated to 3 identical channels.

Masks (``read_mask``): the image is brought to 8 bit as above, then reduced to
one channel (max over the RGB channels, so any coloured label counts), then
binarised:

* ``threshold=None`` (default): if the values are a subset of {0, 1} or of
  {0, 255} the mapping is exact (1 / 255 -> lesion); otherwise the mask is
  "non-binary" (e.g. JPEG-compressed, anti-aliased) and ``value > 127`` ->
  lesion, with ``info['non_binary'] = True``.  (16-bit masks are scaled to
  8 bit first, so {0, 65535} is exact.)
* ``threshold=t``: always ``value > t`` on the 8-bit scale (no exact-set
  detection); ``info['non_binary']`` still reports whether the values were
  outside {0,1} and {0,255}.

``info`` keys: ``original_mode`` (Pillow mode before conversion), ``format``
(Pillow's detected format), ``shape`` (H, W), ``non_binary`` (bool), ``rule``
(``'exact_0_1'``, ``'exact_0_255'`` or ``'gt_<t>'``), ``n_unique`` (number of
distinct 8-bit values), ``lesion_fraction`` (float).

``save_png`` writes atomically (temporary file + ``os.replace``) and creates
the parent directory.  bool arrays are written as 0 / 255.
"""
from __future__ import annotations

import os
import tempfile
import threading
import warnings
import zlib
from typing import Optional

import numpy as np
from PIL import Image, ImageFile, ImageOps

__all__ = [
    'SUPPORTED_EXTENSIONS', 'DEFAULT_MAX_PIXELS', 'ImageReadError',
    'read_image', 'read_mask', 'save_png',
]

SUPPORTED_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')
DEFAULT_MAX_PIXELS = 50_000_000

_LOAD_LOCK = threading.Lock()


class ImageReadError(ValueError):
    """An image/mask file that cannot be used.  ``str()`` is one line."""

    def __init__(self, path, problem: str):
        self.path = os.fspath(path) if path is not None else '<unknown>'
        self.problem = ' '.join(str(problem).split())  # force a single line
        super().__init__(f'{self.path}: {self.problem}')


def _limit_message(w: int, h: int, max_pixels) -> str:
    return (f'image is {w}x{h} = {w * h} pixels, above the limit of '
            f'max_pixels={max_pixels} pixels; refused before decoding')


def _open_checked(path, max_pixels: Optional[int]) -> Image.Image:
    """Validate, open, size-check, fully decode and EXIF-orient one file.

    Returns an in-memory (loaded) Pillow image; the file is closed.
    """
    spath = os.fspath(path)
    ext = os.path.splitext(spath)[1].lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise ImageReadError(
            spath, f'unsupported extension {ext or "(none)"!r}; supported: '
                   f'{", ".join(SUPPORTED_EXTENSIONS)}')
    if not os.path.exists(spath):
        raise ImageReadError(spath, 'file not found')
    if os.path.isdir(spath):
        raise ImageReadError(spath, 'is a directory, not an image file')
    try:
        size = os.path.getsize(spath)
    except OSError as e:
        raise ImageReadError(spath, f'cannot stat file ({e.strerror or e})')
    if size == 0:
        raise ImageReadError(spath, 'file is empty (0 bytes)')

    try:
        f = open(spath, 'rb')
    except OSError as e:
        raise ImageReadError(spath, f'cannot open file ({e.strerror or e})')
    with f:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', Image.DecompressionBombWarning)
                img = Image.open(f)
        except Image.DecompressionBombError as e:
            raise ImageReadError(
                spath, f'image too large: above the limit of max_pixels={max_pixels} '
                       f'pixels (Pillow decompression-bomb guard: {e})')
        except Image.UnidentifiedImageError:
            raise ImageReadError(spath, 'not a recognised image (Pillow cannot '
                                        'identify the content)')
        except Exception as e:  # malformed headers raise all sorts of things
            raise ImageReadError(spath, f'cannot parse image header '
                                        f'({type(e).__name__}: {e})')

        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageReadError(spath, f'invalid image size {w}x{h}')
        if max_pixels is not None and w * h > max_pixels:
            raise ImageReadError(spath, _limit_message(w, h, max_pixels))

        try:
            if getattr(img, 'n_frames', 1) > 1:
                img.seek(0)
        except Exception:
            pass

        try:
            with _LOAD_LOCK:
                old = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = False
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
                        img.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = old
        except MemoryError:
            raise ImageReadError(spath, f'out of memory decoding {w}x{h} image')
        except (OSError, SyntaxError, EOFError, ValueError, zlib.error,
                IndexError, TypeError, KeyError) as e:
            msg = str(e) or type(e).__name__
            if 'truncated' in msg.lower():
                raise ImageReadError(spath, f'truncated or corrupt image data ({msg})')
            raise ImageReadError(spath, f'corrupt image data ({type(e).__name__}: {msg})')

        fmt = img.format
        try:
            oriented = ImageOps.exif_transpose(img)
            if oriented is None:
                oriented = img
        except Exception:
            oriented = img  # malformed EXIF: ignore, keep stored orientation
        oriented.format = fmt  # exif_transpose returns a copy without format
        return oriented


def _scale_int(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr).astype(np.int64)
    if a.size == 0:
        return a.astype(np.uint8)
    a = np.maximum(a, 0)
    mx = int(a.max())
    if mx <= 255:
        return a.astype(np.uint8)
    if mx <= 65535:
        return ((a + 128) // 257).astype(np.uint8)
    return np.clip(np.rint(a.astype(np.float64) * (255.0 / mx)), 0, 255).astype(np.uint8)


def _scale_float(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    a = np.where(np.isfinite(a), a, 0.0)
    a = np.maximum(a, 0.0)
    mx = float(a.max()) if a.size else 0.0
    if mx <= 1.0:
        a = a * 255.0
    elif mx > 255.0:
        a = a * (255.0 / mx)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _to_uint8(img: Image.Image) -> np.ndarray:
    """Pillow image -> uint8 array, HxW (grey) or HxWx3 (RGB)."""
    mode = img.mode
    if mode == '1':
        return np.asarray(img.convert('L'), dtype=np.uint8)
    if mode == 'L':
        return np.asarray(img, dtype=np.uint8)
    if mode in ('LA', 'La'):
        return np.asarray(img.getchannel(0), dtype=np.uint8)
    if mode == 'I' or mode.startswith('I;16'):
        try:
            arr = np.asarray(img)
            if arr.ndim != 2:
                raise ValueError
        except Exception:
            arr = np.asarray(img.convert('I'))
        return _scale_int(arr)
    if mode == 'F':
        return _scale_float(np.asarray(img))
    if mode == 'RGB':
        return np.asarray(img, dtype=np.uint8)
    if mode in ('RGBA', 'RGBX'):
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8)[..., :3])
    if mode in ('P', 'PA'):
        rgba = img.convert('RGBA')  # honours palette transparency ...
        return np.ascontiguousarray(np.asarray(rgba, dtype=np.uint8)[..., :3])  # ... then drop it
    return np.asarray(img.convert('RGB'), dtype=np.uint8)


def read_image(path, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array (see module docstring)."""
    img = _open_checked(path, max_pixels)
    try:
        arr = _to_uint8(img)
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(path, f'cannot convert mode {img.mode!r} to RGB '
                                   f'({type(e).__name__}: {e})')
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def read_mask(path, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
              threshold: Optional[float] = None) -> tuple[np.ndarray, dict]:
    """Read a mask as an HxW uint8 array in {0, 1} plus an info dict."""
    img = _open_checked(path, max_pixels)
    mode = img.mode
    try:
        arr = _to_uint8(img)
    except Exception as e:
        raise ImageReadError(path, f'cannot convert mask mode {mode!r} '
                                   f'({type(e).__name__}: {e})')
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    values = np.unique(arr)
    vals = set(int(v) for v in values)
    is_01 = vals <= {0, 1}
    is_0255 = vals <= {0, 255}
    non_binary = not (is_01 or is_0255)
    if threshold is not None:
        t = float(threshold)
        mask = arr > t
        rule = f'gt_{threshold}'
    elif is_01:
        mask = arr == 1
        rule = 'exact_0_1'
    elif is_0255:
        mask = arr == 255
        rule = 'exact_0_255'
    else:
        mask = arr > 127
        rule = 'gt_127'
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    info = {
        'original_mode': mode,
        'format': getattr(img, 'format', None),
        'shape': tuple(int(s) for s in mask.shape),
        'non_binary': bool(non_binary),
        'rule': rule,
        'n_unique': int(values.size),
        'lesion_fraction': float(mask.mean()) if mask.size else 0.0,
    }
    return mask, info


def save_png(path, array) -> None:
    """Write a uint8 (or bool -> 0/255) HxW or HxWx3 array as a PNG, atomically."""
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise ValueError(f'save_png expects a uint8 (or bool) array, got {arr.dtype}')
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f'save_png expects HxW or HxWx3, got shape {arr.shape}')
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f'save_png got an empty array of shape {arr.shape}')
    spath = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(spath))
    os.makedirs(parent, exist_ok=True)
    img = Image.fromarray(np.ascontiguousarray(arr))
    fd, tmp = tempfile.mkstemp(suffix='.png.tmp', dir=parent)
    try:
        with os.fdopen(fd, 'wb') as fh:
            img.save(fh, format='PNG')
        os.replace(tmp, spath)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
