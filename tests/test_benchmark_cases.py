"""The benchmark studies' shared proxy cases (benchmarks/cases.py) and the library helpers they use
instead of copies: the one uint8 quantiser and the one image score."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import cases  # noqa: E402
from tfsdeploy.imaging import quantise_uint8  # noqa: E402
from tfsdeploy.metrics import score_image  # noqa: E402


def test_quantise_uint8_rounds_half_up_and_clamps():
    x = torch.tensor([-0.2, 0.0, 0.5 / 255, 0.49 / 255, 1.51 / 255, 0.5, 1.0, 1.7])
    expected = np.floor(np.clip(x.numpy().astype(np.float64), 0, 1) * 255 + 0.5).astype(np.uint8)
    got = quantise_uint8(x)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    assert got.tolist() == expected.tolist() == [0, 0, 1, 0, 2, 128, 255, 255]


def test_as_8bit_lands_on_the_8bit_grid():
    x = torch.rand(2, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    y = cases.as_8bit(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y * 255, (y * 255).round())
    assert float((y - x.clamp(0, 1)).abs().max()) <= 0.5 / 255 + 1e-6


def test_score_image_of_an_image_against_itself_and_a_shifted_copy():
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    same = score_image(img, img)
    assert same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0, abs=1e-5)
    off = score_image((img + 0.1).clamp(0, 1), img)
    mse = float((((img + 0.1).clamp(0, 1) - img) ** 2).mean())
    assert off["psnr"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-5)
    assert 0 < off["ssim"] < 1


def test_degrade_blur_is_seeded_8bit_and_downscaled():
    hr = torch.rand(1, 5, 64, 64, generator=torch.Generator().manual_seed(2))
    a, b, c = cases.degrade_blur(hr, 4, 7), cases.degrade_blur(hr, 4, 7), cases.degrade_blur(hr, 4, 8)
    assert a.shape == (1, 5, 16, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)  # the seed alone decides the noise
    assert torch.equal(a * 255, (a * 255).round())
    # blurred then area-averaged: close to the 4x4 means of the input, up to blur, noise and 8 bits
    means = torch.nn.functional.avg_pool2d(hr, 4)
    assert float((a - means).abs().mean()) < 0.15


def test_load_cases_refuses_an_unknown_set_and_icbm_without_the_wheel(tmp_path):
    with pytest.raises(ValueError, match="unknown set 'spm'"):
        cases.load_cases("spm", 4, 1)
    with pytest.raises(SystemExit, match="nilearn wheel"):
        cases.load_cases("icbm", 4, 1, tmp_path / "missing.whl")
    assert cases.find_wheel(str(tmp_path / "given.whl")) == tmp_path / "given.whl"
    found = cases.find_wheel()
    assert found is None or isinstance(found, Path) and found.is_file()


def test_studies_check_their_plan_before_any_work():
    from benchmarks import adapt_study, transfer_study

    with pytest.raises(SystemExit, match="unknown test set"):
        transfer_study.plan(["--model", "m=default", "--datasets", "spm-test,nope"])
    with pytest.raises(SystemExit, match="unknown dataset 'nope'"):
        adapt_study.plan(["--datasets", "spm,nope"])
    p = transfer_study.plan(["--model", "m=x4:a,x8:b", "--datasets", "spm-test", "--alphas", "0,1", "--ensemble"])
    assert p.models == [("m", {4: "a", 8: "b"})] and p.ensembles == (False, True)
    assert p.variant("m", 2, 0.0, True) == "m a0 e8"


@pytest.mark.skipif(cases.find_wheel() is None, reason="needs the nilearn wheel (pip download nilearn --no-deps "
                                                       "-d /tmp/nl)")
def test_icbm_cases_pair_a_downscaled_triplet_with_the_classical_fusion_of_its_sources():
    from tfsdeploy.fusion import fuse_condition

    got = cases.icbm_cases(cases.find_wheel(), 8, 2, coronal=True)
    assert [c.name.split("_")[0] for c in got] == ["icbm-spect", "icbm-pet"]
    assert all(c.name.split("_")[1].startswith("cor") for c in got)
    for c in got:
        assert c.lr.t1.shape == (1, 32, 32) and c.lr.func.shape == (3, 32, 32)
        assert c.gt01.shape == (3, cases.SIZE, cases.SIZE)
    z = int(got[0].name.split("cor")[1])
    hr = cases.icbm_sources(cases.icbm_volumes(cases.find_wheel()), z, "spect", coronal=True)
    assert torch.equal(got[0].gt01, fuse_condition(hr[None])[0])


def test_build_icbm_writes_a_split_dataset_once_axial_or_coronal(tmp_path, monkeypatch):
    """The fine-tuning studies' split: test slices in the middle, training slices at least `gap`
    away on both sides, every file of a dataset folder written, and a finished folder reused."""
    rng = np.random.default_rng(0)
    shape = (40, 48, 44)
    gm = np.zeros(shape, np.float32)
    gm[4:36, 6:42, 6:38] = 0.8  # "brain" on 32 axial and 36 coronal slices
    vols = {k: rng.random(shape).astype(np.float32) for k in ("t1", "t2", "spect", "pet")}
    vols["gm"] = gm
    monkeypatch.setattr(cases, "icbm_volumes", lambda wheel: vols)
    for coronal, view in ((False, "z"), (True, "cor")):
        out = tmp_path / view
        summary = cases.build_icbm(out, Path("nilearn.whl"), 2, 4, 6, coronal=coronal)
        train, test = summary["slices"]["train"], summary["slices"]["test"]
        assert len(test) == 2 and test[1] - test[0] == 2 and len(train) >= 4
        assert summary["min_gap_slices"] >= 4
        for split, zs in summary["slices"].items():
            for d in ("t1", "t2", "func", "gt"):
                names = sorted(p.name for p in (out / split / d).iterdir())
                assert len(names) == len(zs) and all(f"_{view}" in n for n in names)
        (out / "train" / "t1").rename(out / "moved")  # a finished folder is not rebuilt
        assert cases.build_icbm(out, Path("nilearn.whl"), 2, 4, 6, coronal=coronal) == summary
        assert not (out / "train" / "t1").exists()
