"""Hostile-file tests for unisegdiff_jax.image_io (fast, all files made in tmp_path)."""
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from unisegdiff_jax.image_io import (DEFAULT_MAX_PIXELS, SUPPORTED_EXTENSIONS,
                                     ImageReadError, read_image, read_mask,
                                     save_png)


def _noise_rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _one_line(err):
    s = str(err)
    assert '\n' not in s
    return s


# ---------------------------------------------------------------- refusals

def test_constants():
    assert DEFAULT_MAX_PIXELS == 50_000_000
    assert SUPPORTED_EXTENSIONS == ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')
    assert issubclass(ImageReadError, ValueError)


def test_truncated_jpeg(tmp_path):
    full = tmp_path / 'full.jpg'
    Image.fromarray(_noise_rgb(64, 64)).save(full, quality=95)
    data = full.read_bytes()
    p = tmp_path / 'trunc.jpg'
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as ei:
        read_image(p)
    s = _one_line(ei.value)
    assert str(p) in s and 'truncated' in s.lower()
    with pytest.raises(ImageReadError):
        read_mask(p)


def test_truncated_png(tmp_path):
    full = tmp_path / 'full.png'
    Image.fromarray(_noise_rgb(64, 64)).save(full)
    data = full.read_bytes()
    p = tmp_path / 'trunc.png'
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as ei:
        read_image(p)
    assert str(p) in _one_line(ei.value)


def test_zero_byte(tmp_path):
    p = tmp_path / 'empty.png'
    p.write_bytes(b'')
    with pytest.raises(ImageReadError) as ei:
        read_image(p)
    s = _one_line(ei.value)
    assert str(p) in s and 'empty' in s


def test_text_file_named_png(tmp_path):
    p = tmp_path / 'notes.png'
    p.write_text('this is not an image\nreally\n')
    with pytest.raises(ImageReadError) as ei:
        read_image(p)
    s = _one_line(ei.value)
    assert str(p) in s and 'not a recognised image' in s


def test_unsupported_extension(tmp_path):
    p = tmp_path / 'x.gif'
    Image.new('L', (4, 4)).save(p)
    with pytest.raises(ImageReadError) as ei:
        read_image(p)
    assert "'.gif'" in _one_line(ei.value)
    p2 = tmp_path / 'noext'
    p2.write_bytes(b'abc')
    with pytest.raises(ImageReadError):
        read_mask(p2)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError) as ei:
        read_image(tmp_path / 'nope.png')
    assert 'not found' in str(ei.value)


def _png_claiming_size(path, width, height):
    buf = io.BytesIO()
    Image.new('RGB', (1, 1)).save(buf, format='PNG')
    data = bytearray(buf.getvalue())
    assert data[12:16] == b'IHDR'
    data[16:24] = struct.pack('>II', width, height)
    data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def test_huge_header_refused_before_decoding(tmp_path):
    p = tmp_path / 'bomb.png'
    _png_claiming_size(p, 30000, 30000)
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError) as ei:
        read_image(p)
    assert time.perf_counter() - t0 < 2.0
    s = _one_line(ei.value)
    assert str(p) in s and str(DEFAULT_MAX_PIXELS) in s
    with pytest.raises(ImageReadError):
        read_mask(p)


def test_custom_pixel_limit(tmp_path):
    p = tmp_path / 'a.png'
    Image.new('L', (100, 60)).save(p)
    with pytest.raises(ImageReadError) as ei:
        read_image(p, max_pixels=5000)
    s = str(ei.value)
    assert '100x60' in s and 'max_pixels=5000' in s
    assert read_image(p, max_pixels=6000).shape == (60, 100, 3)


# ---------------------------------------------------------------- modes

def test_16bit_png(tmp_path):
    vals = np.array([[0, 257, 65535, 32896], [514, 1000, 60000, 128]], dtype=np.uint16)
    p = tmp_path / 'g16.png'
    Image.fromarray(vals).save(p)
    out = read_image(p)
    assert out.shape == (2, 4, 3) and out.dtype == np.uint8
    expected = np.rint(vals / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_16bit_low_values_clip(tmp_path):
    vals = np.array([[0, 10, 200, 255]], dtype=np.uint16)
    p = tmp_path / 'g16low.png'
    Image.fromarray(vals).save(p)
    np.testing.assert_array_equal(read_image(p)[..., 1], vals.astype(np.uint8))


def test_32bit_int_and_float_tiff(tmp_path):
    vi = np.array([[0, 50000, 100000, 200000]], dtype=np.int32)
    p = tmp_path / 'i32.tif'
    Image.fromarray(vi).save(p)
    out = read_image(p)[..., 0]
    np.testing.assert_array_equal(out, np.rint(vi * 255.0 / 200000).astype(np.uint8))

    vf = np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)
    pf = tmp_path / 'f.tif'
    Image.fromarray(vf).save(pf)
    np.testing.assert_array_equal(read_image(pf)[..., 0], [[0, 128, 255, 0]])


def test_rgba_alpha_dropped(tmp_path):
    p = tmp_path / 'rgba.png'
    arr = np.zeros((3, 5, 4), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = 10, 20, 30
    arr[..., 3] = 0  # fully transparent: colour must still be kept
    arr[0, 0] = (200, 100, 50, 255)
    Image.fromarray(arr, 'RGBA').save(p)
    out = read_image(p)
    assert out.shape == (3, 5, 3)
    np.testing.assert_array_equal(out[1, 1], [10, 20, 30])
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / 'cmyk.jpg'
    Image.new('CMYK', (8, 6), (0, 0, 0, 0)).save(p, quality=95)
    with Image.open(p) as im:
        assert im.mode == 'CMYK'
    out = read_image(p)
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    assert out.min() >= 250  # no ink -> white


def test_palette_png_with_transparency(tmp_path):
    p = tmp_path / 'pal.png'
    img = Image.new('P', (4, 2), 0)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    img.putpixel((1, 0), 1)
    img.putpixel((2, 1), 2)
    img.save(p, transparency=0)
    out = read_image(p)
    assert out.shape == (2, 4, 3)
    np.testing.assert_array_equal(out[0, 1], [255, 0, 0])
    np.testing.assert_array_equal(out[1, 2], [0, 255, 0])
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])


def test_one_by_one(tmp_path):
    p = tmp_path / 'px.bmp'
    Image.new('RGB', (1, 1), (1, 2, 3)).save(p)
    out = read_image(p)
    assert out.shape == (1, 1, 3)
    np.testing.assert_array_equal(out[0, 0], [1, 2, 3])


def test_exif_rotation_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)  # H=20, W=40
    arr[:8, :8] = (255, 0, 0)              # red block at top-left
    exif = Image.Exif()
    exif[0x0112] = 6                       # rotate 90 deg clockwise to display
    p = tmp_path / 'rot.jpg'
    Image.fromarray(arr).save(p, exif=exif, quality=95)
    out = read_image(p)
    assert out.shape == (40, 20, 3)
    # top-left of the stored image ends up top-right after a 90 deg CW turn
    assert out[1:7, 13:19, 0].mean() > 200 and out[1:7, 1:7, 0].mean() < 50
    mask, _ = read_mask(p)
    assert mask.shape == (40, 20)


def test_grey_to_three_identical_channels(tmp_path):
    g = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    p = tmp_path / 'g.png'
    Image.fromarray(g).save(p)
    out = read_image(p)
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_bilevel_and_la(tmp_path):
    p1 = tmp_path / 'b.png'
    b = Image.new('1', (3, 2), 0)
    b.putpixel((0, 0), 1)
    b.save(p1)
    out = read_image(p1)
    assert out[0, 0].tolist() == [255] * 3 and out[1, 1].tolist() == [0] * 3
    p2 = tmp_path / 'la.png'
    Image.new('LA', (3, 2), (77, 0)).save(p2)
    assert (read_image(p2) == 77).all()


# ---------------------------------------------------------------- masks

def test_mask_0_255(tmp_path):
    m = np.zeros((5, 6), np.uint8)
    m[1:3, 2:5] = 255
    p = tmp_path / 'm.png'
    Image.fromarray(m).save(p)
    mask, info = read_mask(p)
    assert mask.dtype == np.uint8 and mask.shape == (5, 6)
    np.testing.assert_array_equal(mask, (m == 255).astype(np.uint8))
    assert info['non_binary'] is False and info['original_mode'] == 'L'
    assert info['rule'] == 'exact_0_255'


def test_mask_0_1(tmp_path):
    m = np.zeros((5, 6), np.uint8)
    m[0, 0] = 1
    m[4, 5] = 1
    p = tmp_path / 'm01.png'
    Image.fromarray(m).save(p)
    mask, info = read_mask(p)
    np.testing.assert_array_equal(mask, m)
    assert info['non_binary'] is False and info['rule'] == 'exact_0_1'


def test_mask_non_binary_jpeg(tmp_path):
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 20:44] = 255
    p = tmp_path / 'm.jpg'
    Image.fromarray(m).save(p, quality=75)
    mask, info = read_mask(p)
    assert info['non_binary'] is True and info['rule'] == 'gt_127'
    assert set(np.unique(mask).tolist()) <= {0, 1}
    assert (mask == (m > 0)).mean() > 0.97


def test_mask_rgb_max_channel_and_16bit(tmp_path):
    arr = np.zeros((4, 4, 3), np.uint8)
    arr[1, 1] = (255, 0, 0)
    p = tmp_path / 'rgbmask.png'
    Image.fromarray(arr).save(p)
    mask, info = read_mask(p)
    assert mask.sum() == 1 and mask[1, 1] == 1 and info['original_mode'] == 'RGB'

    m16 = np.zeros((3, 3), np.uint16)
    m16[2, 2] = 65535
    p16 = tmp_path / 'm16.png'
    Image.fromarray(m16).save(p16)
    mask, info = read_mask(p16)
    assert mask.sum() == 1 and mask[2, 2] == 1 and info['non_binary'] is False


def test_mask_explicit_threshold(tmp_path):
    m = np.array([[0, 50, 100, 200]], np.uint8)
    p = tmp_path / 't.png'
    Image.fromarray(m).save(p)
    mask, info = read_mask(p, threshold=75)
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1]])
    assert info['non_binary'] is True


def test_save_png_roundtrip(tmp_path):
    rgb = _noise_rgb(7, 9)
    p = tmp_path / 'sub' / 'o.png'
    save_png(p, rgb)
    np.testing.assert_array_equal(read_image(p), rgb)
    g = (np.arange(63, dtype=np.uint8).reshape(7, 9))
    save_png(tmp_path / 'g.png', g)
    np.testing.assert_array_equal(read_image(tmp_path / 'g.png')[..., 0], g)
    with pytest.raises(ValueError):
        save_png(tmp_path / 'bad.png', np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError):
        save_png(tmp_path / 'bad.png', np.zeros((3, 3, 4), np.uint8))
