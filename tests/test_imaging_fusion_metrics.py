import os

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tfsdeploy.errors import UserError
from tfsdeploy.fusion import box_filter, fuse_condition, fuse_trimodal, fuse_two
from tfsdeploy.imaging import (apply_colormap, colormap_lut, degrade, pad_to_square, read_image, rgb_to_ycbcr,
                               write_png, ycbcr_to_rgb)
from tfsdeploy.metrics import psnr, ssim

# --------------------------------------------------------------------------- reading


def test_reads_8bit_grey_png(tmp_path):
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(arr).save(tmp_path / "a.png")
    t = read_image(tmp_path / "a.png")
    assert t.shape == (1, 16, 16)
    torch.testing.assert_close(t[0], torch.from_numpy(arr / 255.0).float())


def test_reads_16bit_png_and_tiff(tmp_path):
    arr = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    Image.fromarray(arr).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", arr)
    rgb16 = np.stack([arr, arr // 2, arr // 4], -1).astype(np.uint16)
    tifffile.imwrite(tmp_path / "rgb.tiff", rgb16)
    for name in ("a.png", "a.tif"):
        t = read_image(tmp_path / name)
        assert t.shape == (1, 16, 16)
        torch.testing.assert_close(t[0], torch.from_numpy(arr / 65535.0).float())
    t = read_image(tmp_path / "rgb.tiff")
    assert t.shape == (3, 16, 16)
    torch.testing.assert_close(t[1], torch.from_numpy((arr // 2) / 65535.0).float())


def test_12bit_data_in_a_16bit_png_fills_the_range(tmp_path):
    """12-bit data stored in 16 bits is divided by 4095, not 65535 (it used to come out 16x too dim)."""
    arr = np.linspace(0, 4095, 256).astype(np.uint16).reshape(16, 16)
    Image.fromarray(arr).save(tmp_path / "a12.png")
    torch.testing.assert_close(read_image(tmp_path / "a12.png")[0], torch.from_numpy(arr / 4095.0).float())
    ten = (arr // 4).astype(np.uint16)  # 10-bit: max 1023
    tifffile.imwrite(tmp_path / "a10.tif", ten)
    torch.testing.assert_close(read_image(tmp_path / "a10.tif")[0], torch.from_numpy(ten / 1023.0).float())


def test_float_images_outside_unit_range_are_normalised_robustly(tmp_path):
    """A float TIFF of 0..1000 used to be clipped to [0, 1] (almost all white); it is mapped by the
    volume rule instead: 1st percentile -> 0, 99.5th percentile of the foreground -> 1."""
    rng = np.random.default_rng(0)
    arr = (rng.random((32, 32)) * 1000).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", arr)
    t = read_image(tmp_path / "f.tif")[0].numpy()
    lo = np.percentile(arr, 1.0)
    hi = np.percentile(arr[arr > lo], 99.5)
    np.testing.assert_allclose(t, np.clip((arr - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert 0.4 < t.mean() < 0.6  # not saturated
    unit = rng.random((8, 8)).astype(np.float32)  # floats already in [0, 1] are kept as they are
    tifffile.imwrite(tmp_path / "u.tif", unit)
    torch.testing.assert_close(read_image(tmp_path / "u.tif")[0], torch.from_numpy(unit))
    signed = (rng.random((16, 16)) * 2000 - 1000).astype(np.int16)  # CT numbers
    tifffile.imwrite(tmp_path / "ct.tif", signed)
    t = read_image(tmp_path / "ct.tif")
    assert float(t.min()) == 0.0 and float(t.max()) == 1.0


def test_reads_rgb_jpeg_and_drops_alpha(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=100)
    t = read_image(tmp_path / "a.jpg")
    assert t.shape == (3, 8, 8) and abs(float(t[0].mean()) - 200 / 255) < 0.02
    Image.fromarray(np.dstack([rgb, np.full((8, 8), 7, np.uint8)])).save(tmp_path / "a.png")
    t = read_image(tmp_path / "a.png")
    assert t.shape == (3, 8, 8) and float(t[0, 0, 0]) == pytest.approx(200 / 255)


def test_bad_files_raise_user_errors(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image")
    with pytest.raises(UserError, match="cannot read as an image"):
        read_image(tmp_path / "notes.png")
    with pytest.raises(UserError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(UserError, match="not a file"):
        read_image(tmp_path)


def test_write_png_is_atomic_and_round_trips(tmp_path):
    img = torch.rand(3, 10, 12)
    write_png(tmp_path / "o.png", img)
    back = read_image(tmp_path / "o.png")
    assert (back - img).abs().max() <= 0.5 / 255 + 1e-6
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]
    with pytest.raises(UserError, match="does not exist"):
        write_png(tmp_path / "nodir" / "o.png", img)


def test_write_png_failure_leaves_nothing(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(PILImage.Image, "save", boom)
    with pytest.raises(OSError):
        write_png(tmp_path / "o.png", torch.rand(3, 4, 4))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- colour and resampling


def test_colormap_is_fixed_and_monotone_in_brightness():
    lut = colormap_lut()
    assert lut.shape == (256, 3)
    torch.testing.assert_close(lut[0], torch.zeros(3))
    torch.testing.assert_close(lut[-1], torch.ones(3))
    g = torch.linspace(0, 1, 256).view(1, 1, 256)
    rgb = apply_colormap(g)
    assert rgb.shape == (3, 1, 256)
    torch.testing.assert_close(rgb[:, 0, :].T, lut, atol=1e-5, rtol=0)


def test_ycbcr_round_trip_and_known_values():
    rgb = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(ycbcr_to_rgb(rgb_to_ycbcr(rgb)), rgb, atol=1e-5, rtol=0)
    white = torch.ones(3, 1, 1)
    torch.testing.assert_close(rgb_to_ycbcr(white).flatten(), torch.tensor([1.0, 0.5, 0.5]), atol=1e-5, rtol=0)


def test_degrade_keeps_size_and_constants_and_removes_detail():
    flat = torch.full((1, 1, 64, 64), 0.4)
    torch.testing.assert_close(degrade(flat, 4), flat, atol=1e-5, rtol=0)
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2
    out = degrade(checker.float()[None, None], 4)
    assert out.shape == (1, 1, 64, 64) and float(out.std()) < 0.05
    with pytest.raises(UserError):
        degrade(torch.zeros(1, 1, 30, 30), 4)


def test_pad_to_square_centres():
    img, pads = pad_to_square(torch.ones(1, 4, 8))
    assert img.shape == (1, 8, 8) and pads == (2, 2, 0, 0)
    assert float(img[0, :2].sum()) == 0 and float(img[0, 2:6].sum()) == 32


# --------------------------------------------------------------------------- classical fusion


def test_fusing_an_image_with_itself_returns_it():
    a = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(fuse_two(a, a), a, atol=1e-6, rtol=0)


def test_trimodal_fusion_with_mr_equal_to_luma_returns_the_functional_image():
    func = torch.rand(1, 3, 32, 32) * 0.8 + 0.1
    y = rgb_to_ycbcr(func)[:, :1]
    torch.testing.assert_close(fuse_trimodal(y, y, func), func, atol=1e-5, rtol=0)


def test_detail_comes_from_the_sharper_source():
    flat = torch.full((1, 1, 32, 32), 0.5)
    sharp = flat.clone()
    sharp[..., :, 16:] = 0.7  # an edge
    fused = fuse_two(flat, sharp)
    # the step survives (not averaged away to half its height)
    assert float(fused[0, 0, 16, 20] - fused[0, 0, 16, 11]) > 0.15
    assert fuse_two(sharp, flat).allclose(fused, atol=1e-6)


def test_base_layer_favours_the_brighter_source():
    dark, bright = torch.full((1, 1, 32, 32), 0.1), torch.full((1, 1, 32, 32), 0.8)
    val = float(fuse_two(dark, bright).mean())
    assert 0.45 < val < 0.8  # energy-weighted, so above the plain mean of 0.45


def test_fuse_condition_matches_fuse_trimodal_and_box_filter_is_a_mean():
    c = torch.rand(2, 5, 16, 16)
    torch.testing.assert_close(fuse_condition(c), fuse_trimodal(c[:, :1], c[:, 1:2], c[:, 2:]))
    x = torch.rand(1, 1, 9, 9)
    assert float(box_filter(x, 1)[0, 0, 4, 4]) == pytest.approx(float(x[0, 0, 3:6, 3:6].mean()), abs=1e-6)


# --------------------------------------------------------------------------- metrics vs scikit-image


def test_ssim_and_psnr_match_scikit_image():
    rng = np.random.default_rng(0)
    t = rng.random((3, 40, 48)).astype(np.float32)
    p = np.clip(t + rng.normal(0, 0.1, t.shape), 0, 1).astype(np.float32)
    ours = float(ssim(torch.from_numpy(p)[None], torch.from_numpy(t)[None]))
    ref = structural_similarity(t, p, channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, win_size=11)
    assert ours == pytest.approx(ref, abs=1e-4)
    assert float(psnr(torch.from_numpy(p)[None], torch.from_numpy(t)[None])) == pytest.approx(
        peak_signal_noise_ratio(t, p, data_range=1.0), abs=1e-3)


def test_ssim_of_identical_images_is_one_and_needs_a_window():
    x = torch.rand(1, 3, 16, 16)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


def test_no_tmp_files_left_anywhere(tmp_path):
    write_png(tmp_path / "x.png", torch.rand(1, 4, 4))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
