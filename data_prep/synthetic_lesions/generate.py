"""Procedural lesion images: the `synthetic_lesions` dataset's generator.

`generate_example(seed)` is a pure function of `seed` (numpy `default_rng`), so the dataset is
reproducible bit for bit and testable without TFDS. Every example:

* native size: H and W drawn independently in [64, 112] (not square in general);
* one lesion of irregular shape: a star-shaped region whose radius is a sum of random Fourier
  harmonics (k = 2..5), with its boundary further perturbed by smoothed noise; the region is scaled
  so that it covers exactly a random 5 %..45 % of the frame. The mask is binary {0, 1}; only the
  image has a soft (Gaussian-blurred, sigma 0.6..1.3 px, i.e. a 1-3 px wide) border;
* one of three "modalities" (equal probability):
  - `dermoscopy` (organ `skin`): skin-tone background, brown lesion with darker core, blotches
    and pigment dots, sometimes a dark circular vignette;
  - `ultrasound` (organ `breast`): grey layered tissue, hypoechoic (darker) lesion with sparse
    internal echoes, sometimes a bright rim and posterior enhancement / shadowing, depth
    attenuation and multiplicative (gamma) speckle;
  - `endoscopy` (organ `colon`): pink/red mucosa with vessels, a polyp of slightly different
    hue and finer texture, dome shading and specular highlights (some highlights also fall on the
    mucosa), strong off-centre vignette.
* illumination: multiplicative linear gradient + low-frequency field (+ vignette), strong enough
  that lesion and background intensity ranges overlap within one image, and a per-image lesion
  contrast. A single global intensity threshold therefore segments poorly, while the local
  colour / texture / contrast cue keeps the lesion plainly visible.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

MODALITIES = ('dermoscopy', 'ultrasound', 'endoscopy')
ORGANS = {'dermoscopy': 'skin', 'ultrasound': 'breast', 'endoscopy': 'colon'}
MIN_SIZE, MAX_SIZE = 64, 112
MIN_AREA, MAX_AREA = 0.05, 0.45


def _smooth_noise(rng, shape, sigma):
  """Zero-mean, unit-std Gaussian-smoothed white noise (sigma scalar or (sy, sx))."""
  n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode='reflect')
  return (n - n.mean()) / (n.std() + 1e-8)


def _grid(h, w):
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  return y, x


def _lesion_shape(rng, h, w):
  """Returns (mask bool HxW, rho HxW: normalised radius, 1 on the boundary, centre (cy, cx))."""
  y, x = _grid(h, w)
  cy = rng.uniform(0.3, 0.7) * (h - 1)
  cx = rng.uniform(0.3, 0.7) * (w - 1)
  aspect = rng.uniform(0.7, 1.4)
  rot = rng.uniform(0, np.pi)
  dy, dx = y - cy, x - cx
  # Anisotropy: stretch along a random axis.
  u = dx * np.cos(rot) + dy * np.sin(rot)
  v = -dx * np.sin(rot) + dy * np.cos(rot)
  u = u / np.sqrt(aspect)
  v = v * np.sqrt(aspect)
  dist = np.hypot(u, v)
  theta = np.arctan2(v, u)
  radius = np.ones_like(theta)
  for k in range(2, 6):
    amp = rng.uniform(0.0, 0.32) / k ** 0.7
    radius += amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
  radius = np.maximum(radius, 0.3)
  rho = dist / radius
  # Boundary roughness: perturb by smoothed noise, relative to the size scale.
  scale = np.sqrt(h * w)
  rho = rho + rng.uniform(0.02, 0.06) * scale * _smooth_noise(rng, (h, w), rng.uniform(1.5, 3.0))
  area = rng.uniform(MIN_AREA, MAX_AREA)
  level = np.quantile(rho, area)
  mask = rho <= level
  # Keep the largest connected component (noise can detach islands) ...
  lab, n = ndimage.label(mask)
  if n > 1:
    sizes = ndimage.sum(mask, lab, range(1, n + 1))
    mask = lab == (1 + int(np.argmax(sizes)))
  mask = ndimage.binary_fill_holes(mask)
  # ... and re-grow/shrink to stay inside the area range after that.
  frac = mask.mean()
  if frac < MIN_AREA or frac > MAX_AREA:
    mask = rho <= np.quantile(rho, np.clip(area, MIN_AREA + 0.01, MAX_AREA - 0.01))
  return mask, rho / max(level, 1e-6), (cy, cx)


def _illumination(rng, h, w, strength):
  """Multiplicative illumination: linear gradient (random direction) + low-frequency field."""
  y, x = _grid(h, w)
  yn, xn = 2 * y / (h - 1) - 1, 2 * x / (w - 1) - 1
  ang = rng.uniform(0, 2 * np.pi)
  lin = (xn * np.cos(ang) + yn * np.sin(ang)) / np.sqrt(2)
  field = lin * strength + 0.12 * _smooth_noise(rng, (h, w), max(h, w) / 4)
  return np.exp(field)


def _vignette(rng, h, w, strength, off=0.3):
  y, x = _grid(h, w)
  cy = (0.5 + rng.uniform(-off, off)) * (h - 1)
  cx = (0.5 + rng.uniform(-off, off)) * (w - 1)
  r2 = ((y - cy) / h) ** 2 + ((x - cx) / w) ** 2
  return np.exp(-strength * r2)


def _soft(mask, rng):
  return ndimage.gaussian_filter(mask.astype(np.float64), rng.uniform(0.6, 1.3))


def _dermoscopy(rng, h, w, mask, rho, alpha):
  tone = rng.uniform(180, 235)
  skin = np.array([tone, tone * rng.uniform(0.66, 0.80), tone * rng.uniform(0.52, 0.68)])
  tex = 1 + 0.05 * _smooth_noise(rng, (h, w), 3.0) + 0.025 * _smooth_noise(rng, (h, w), 1.0)
  bg = skin[None, None, :] * tex[..., None]
  # Lesion: brown, darker towards the core, blotchy, with pigment dots.
  lr = rng.uniform(95, 165)
  les = np.array([lr, lr * rng.uniform(0.52, 0.70), lr * rng.uniform(0.38, 0.58)])
  core = 1 - rng.uniform(0.1, 0.35) * np.clip(1 - rho, 0, 1)
  blotch = 1 + 0.16 * _smooth_noise(rng, (h, w), rng.uniform(1.5, 3.0))
  dots = np.where(_smooth_noise(rng, (h, w), 0.8) > 1.4, 0.72, 1.0)
  les = les[None, None, :] * (core * blotch * dots)[..., None]
  contrast = rng.uniform(0.6, 1.0)
  a = (alpha * contrast)[..., None]
  refl = bg * (1 - a) + les * a
  illum = _illumination(rng, h, w, rng.uniform(0.45, 0.8))
  if rng.random() < 0.35:  # dark circular vignette (dermatoscope lens)
    illum = illum * np.clip(_vignette(rng, h, w, rng.uniform(2.0, 4.0), 0.1) * 1.4, 0, 1)
  img = refl * illum[..., None]
  img += rng.normal(0, 2.5, img.shape)
  return img


def _ultrasound(rng, h, w, mask, rho, alpha):
  tissue = (0.55 + 0.13 * _smooth_noise(rng, (h, w), (1.0, rng.uniform(3, 6)))
            + 0.08 * _smooth_noise(rng, (h, w), 4.0))
  inside = 0.55 * rng.uniform(0.2, 0.45) * (1 + 0.25 * _smooth_noise(rng, (h, w), 1.2))
  refl = tissue * (1 - alpha) + inside * alpha
  if rng.random() < 0.5:  # bright-ish echogenic rim
    ring = np.exp(-((rho - 1.08) / 0.07) ** 2)
    refl = refl + rng.uniform(0.15, 0.35) * ring
  if rng.random() < 0.5:  # posterior enhancement (>1) or shadowing (<1) below the lesion
    cols = ndimage.gaussian_filter1d(mask.any(axis=0).astype(np.float64), 2.0)
    below = np.cumsum(mask, axis=0) > 0
    below = ndimage.gaussian_filter(below.astype(np.float64) * (1 - alpha), 2.0) * cols[None, :]
    refl = refl * (1 + rng.choice([-1, 1]) * rng.uniform(0.15, 0.35) * below)
  y, x = _grid(h, w)
  depth = np.exp(-rng.uniform(0.2, 0.9) * y / (h - 1))  # attenuation with depth (top = probe)
  illum = depth * _illumination(rng, h, w, rng.uniform(0.3, 0.6))
  looks = rng.uniform(3, 8)
  speckle = ndimage.gaussian_filter(rng.gamma(looks, 1 / looks, (h, w)), 0.6)
  grey = 255 * rng.uniform(0.8, 1.2) * refl * illum * speckle
  return np.repeat(grey[..., None], 3, axis=-1)


def _endoscopy(rng, h, w, mask, rho, alpha, centre):
  r0 = rng.uniform(175, 230)
  muc = np.array([r0, r0 * rng.uniform(0.36, 0.55), r0 * rng.uniform(0.32, 0.50)])
  tex = 1 + 0.06 * _smooth_noise(rng, (h, w), 3.5)
  bg = muc[None, None, :] * tex[..., None]
  vessels = np.abs(_smooth_noise(rng, (h, w), rng.uniform(2.0, 3.5))) < 0.09
  vessels = ndimage.gaussian_filter(vessels.astype(np.float64), 0.5)
  bg = bg * (1 - vessels[..., None] * np.array([0.18, 0.35, 0.30]))
  # Polyp: hue shift (paler/orange or redder), finer texture, dome shading.
  shift = np.array([rng.uniform(0.88, 1.05), rng.uniform(1.12, 1.45), rng.uniform(1.0, 1.35)])
  if rng.random() < 0.3:
    shift = np.array([rng.uniform(1.0, 1.1), rng.uniform(0.6, 0.75), rng.uniform(0.65, 0.8)])
  ptex = 1 + 0.07 * _smooth_noise(rng, (h, w), 1.0)
  pol = muc[None, None, :] * shift[None, None, :] * ptex[..., None]
  edt = ndimage.distance_transform_edt(mask)
  height = ndimage.gaussian_filter(np.sqrt(edt / max(edt.max(), 1.0)), 1.5)
  gy, gx = np.gradient(height)
  ang = rng.uniform(0, 2 * np.pi)
  lx, ly = np.cos(ang), np.sin(ang)
  k = 0.5 * np.sqrt(h * w) / 10
  shade = np.clip(1 + k * (gx * lx + gy * ly) * rng.uniform(0.6, 1.2), 0.55, 1.5)
  contrast = rng.uniform(0.7, 1.0)
  a = (alpha * contrast)[..., None]
  refl = bg * (1 - a) + pol * shade[..., None] * a
  # Crease / shadow at the polyp base, just outside its boundary.
  crease = np.exp(-(ndimage.distance_transform_edt(~mask) / rng.uniform(1.0, 2.0)) ** 2) * (1 - mask)
  refl = refl * (1 - rng.uniform(0.15, 0.3) * crease)[..., None]
  illum = _illumination(rng, h, w, rng.uniform(0.3, 0.6)) * _vignette(rng, h, w, rng.uniform(2.0, 4.0))
  img = refl * (illum / illum.max() * rng.uniform(1.0, 1.3))[..., None]
  # Specular highlights: on the polyp near the lit side of the dome, and a few on the mucosa.
  y, x = _grid(h, w)
  spots = np.zeros((h, w))
  ys, xs = np.nonzero(mask & (height > 0.4))
  for _ in range(rng.integers(1, 4)):
    if len(ys):
      i = rng.integers(len(ys))
      r = rng.uniform(0.8, 2.0)
      spots += np.exp(-(((y - ys[i]) ** 2 + (x - xs[i]) ** 2) / (2 * r * r)))
  for _ in range(rng.integers(0, 4)):
    r = rng.uniform(0.6, 1.5)
    sy, sx = rng.uniform(0, h), rng.uniform(0, w)
    spots += np.exp(-(((y - sy) ** 2 + (x - sx) ** 2) / (2 * r * r)))
  img = img + np.clip(spots, 0, 1)[..., None] * 255
  img += rng.normal(0, 2.0, img.shape)
  return img


def generate_example(seed: int) -> dict:
  """One synthetic example, a pure function of `seed`.

  Returns dict(image=HxWx3 uint8, mask=HxW uint8 in {0, 1}, modality=str, organ=str).
  """
  rng = np.random.default_rng([int(seed), 0x5E9D1FF])
  h = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
  w = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
  modality = MODALITIES[int(rng.integers(len(MODALITIES)))]
  mask, rho, centre = _lesion_shape(rng, h, w)
  alpha = _soft(mask, rng)
  if modality == 'dermoscopy':
    img = _dermoscopy(rng, h, w, mask, rho, alpha)
  elif modality == 'ultrasound':
    img = _ultrasound(rng, h, w, mask, rho, alpha)
  else:
    img = _endoscopy(rng, h, w, mask, rho, alpha, centre)
  image = np.clip(np.round(img), 0, 255).astype(np.uint8)
  return dict(image=image, mask=mask.astype(np.uint8), modality=modality, organ=ORGANS[modality])


def split_seed(split: str, index: int) -> int:
  """Seed of example `index` of `split`: disjoint, stable ranges per split."""
  offsets = {'train': 0, 'val': 10_000_000, 'test': 20_000_000}
  return offsets[split] + int(index)


def best_global_threshold_dice(image: np.ndarray, mask: np.ndarray) -> float:
  """Best Dice of `grey > t` or `grey < t` over all thresholds t (grey = channel mean)."""
  grey = np.round(image.astype(np.float64).mean(axis=-1)).astype(np.int64).ravel()
  m = mask.ravel().astype(bool)
  pos = np.bincount(grey[m], minlength=256).astype(np.float64)
  neg = np.bincount(grey[~m], minlength=256).astype(np.float64)
  n_pos = pos.sum()
  # pred = grey >= t for t in 0..256
  tp_hi = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]])
  fp_hi = np.concatenate([np.cumsum(neg[::-1])[::-1], [0.0]])
  tp_lo = n_pos - tp_hi
  fp_lo = neg.sum() - fp_hi
  d_hi = 2 * tp_hi / np.maximum(tp_hi + fp_hi + n_pos, 1)
  d_lo = 2 * tp_lo / np.maximum(tp_lo + fp_lo + n_pos, 1)
  return float(max(d_hi.max(), d_lo.max()))
