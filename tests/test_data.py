import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_folder
from tfsdeploy.errors import UserError
from tfsdeploy.imaging import read_image
from tfsdeploy.data import FolderSource, load_spm_volumes, make_batch, open_split
from tfsdeploy.data.spm import brain_slices, split_by_blocks
from tfsdeploy.data.augment import augment


def test_split_by_blocks_is_contiguous_with_guards():
    zs = list(range(5, 76))
    sp = split_by_blocks(zs, block=7, pattern="TTETV")
    all_z = sp["train"] + sp["val"] + sp["test"]
    assert len(all_z) == len(set(all_z))  # disjoint
    for a in ("train", "val", "test"):
        for b in ("train", "val", "test"):
            if a != b:  # no slice has a neighbour in another split
                assert min(abs(x - y) for x in sp[a] for y in sp[b]) >= 2
    assert len(sp["test"]) >= 10 and len(sp["val"]) >= 10 and len(sp["train"]) > len(sp["test"])


def test_spm_volumes_are_registered_and_hold_about_70_brain_slices():
    vols = load_spm_volumes()
    assert set(vols) >= {"t1", "t2", "pd", "spect", "pet"}
    assert len({v.shape for v in vols.values()}) == 1
    zs = brain_slices(vols["grey"])
    assert 60 <= len(zs) <= 80
    # registered: T1 and T2 brain masks overlap strongly on a mid slice
    z = zs[len(zs) // 2]
    m1, m2 = vols["t1"][z] > 0.3 * vols["t1"].max(), vols["t2"][z] > 0.1 * vols["t2"].max()
    assert (m1 & m2).sum() / m1.sum() > 0.8


def test_built_spm_dataset(spm_dataset):
    summary = json.loads((spm_dataset / "summary.json").read_text())
    assert set(summary["combos"]) >= {"t1-t2-spect", "t1-t2-pet"}
    for split in ("train", "val", "test"):
        names = {p.name for p in (spm_dataset / split / "gt").iterdir()}
        assert len(names) == summary["counts"][split] > 0
        for d in ("t1", "t2", "func"):
            assert {p.name for p in (spm_dataset / split / d).iterdir()} == names
    zs = {s: set(summary["sources"]["spm"]["slices"][s]) for s in ("train", "val", "test")}
    assert not (zs["train"] & zs["test"]) and not (zs["train"] & zs["val"]) and not (zs["val"] & zs["test"])
    func = read_image(next((spm_dataset / "test" / "func").iterdir()))
    assert func.shape == (3, 64, 64)
    assert float((func[0] - func[2]).abs().mean()) > 0.05  # colour-mapped, not grey
    src = FolderSource(spm_dataset / "test", size=64)
    assert not src.gt_made and len(src) == summary["counts"]["test"]


def test_folder_source_matches_by_name_not_order(tmp_path):
    root = write_folder(tmp_path / "ds", ["a", "b"], size=32, gt=False)
    # swap file names in one modality only: pairing by sorted order would now mismatch
    t2 = root / "t2"
    (t2 / "a.png").rename(t2 / "tmp.png")
    (t2 / "b.png").rename(t2 / "a.png")
    (t2 / "tmp.png").rename(t2 / "b.png")
    src = FolderSource(root, size=32)
    samples = {s.name: s for s in src.load()}
    expect = read_image(t2 / "a.png")[0]
    got = samples["a"].hr[1].float() / 255
    assert (got - expect).abs().max() < 1.5 / 255
    assert src.gt_made and all(s.gt_made for s in samples.values())


def test_folder_source_errors(tmp_path):
    root = write_folder(tmp_path / "ds", ["a", "b"], size=32)
    (root / "func" / "b.png").unlink()
    with pytest.raises(UserError, match="not present in all"):
        FolderSource(root)
    with pytest.raises(UserError, match="missing modality"):
        FolderSource(root / "t1")
    with pytest.raises(UserError, match="no such dataset"):
        FolderSource(tmp_path / "nope")
    other = write_folder(tmp_path / "ds2", ["a"], size=32)
    Image.fromarray(np.zeros((40, 32), np.uint8)).save(other / "t2" / "a.png")
    with pytest.raises(UserError, match="different sizes"):
        FolderSource(other).load()
    with pytest.raises(UserError, match="neither"):
        open_split(tmp_path, "train")


def test_make_batch_is_deterministic_and_shaped(synth_dataset):
    samples = FolderSource(synth_dataset / "train", size=64).load()
    a = make_batch(samples, [0, 3], [4, 8], 32, np.random.default_rng(5), augment)
    b = make_batch(samples, [0, 3], [4, 8], 32, np.random.default_rng(5), augment)
    c = make_batch(samples, [0, 3], [4, 8], 32, np.random.default_rng(6), augment)
    assert a.cond01.shape == (2, 5, 32, 32) and a.base01.shape == a.gt01.shape == (2, 3, 32, 32)
    assert torch.equal(a.cond01, b.cond01) and torch.equal(a.gt01, b.gt01)
    assert not torch.equal(a.gt01, c.gt01)
    assert set(a.scales) <= {4, 8}
    full = make_batch(samples, [1], [2], 0, np.random.default_rng(0))
    assert full.cond01.shape == (1, 5, 64, 64)
    assert 0 <= float(full.cond01.min()) and float(full.cond01.max()) <= 1


def test_make_batch_from_a_stack_matches_the_list_and_the_per_sample_recipe(synth_dataset):
    from tfsdeploy.fusion import fuse_condition
    from tfsdeploy.imaging import degrade
    from tfsdeploy.data import stack_samples

    samples = open_split(synth_dataset, "train", 64).load()
    a = make_batch(samples, [4, 1, 4], [2, 4, 8], 32, np.random.default_rng(3), augment)
    b = make_batch(stack_samples(samples), [4, 1, 4], [2, 4, 8], 32, np.random.default_rng(3), augment)
    for x, y in zip((a.cond01, a.base01, a.gt01), (b.cond01, b.base01, b.gt01)):
        assert torch.equal(x, y)
    assert a.scales == b.scales
    # without augmentation or crops, each item is exactly degrade + classical fusion of that sample
    c = make_batch(samples, [0, 2], [2, 8], 0, np.random.default_rng(1))
    for i, n in enumerate([0, 2]):
        hr = samples[n].hr.float()[None] / 255
        cond = degrade(hr[:, :5], c.scales[i])
        assert torch.allclose(c.cond01[i], cond[0], atol=1e-6)
        assert torch.allclose(c.base01[i], fuse_condition(cond)[0], atol=1e-6)
        assert torch.equal(c.gt01[i], hr[0, 5:])


def test_a_back_projected_batch_is_what_fuse_feeds_a_member_with_that_strength(synth_dataset):
    """make_batch(backproject=S) makes the condition as `make_condition` does for a member of
    strength S (bicubic down, bicubic up, S of back-projection), and the baseline from it; the
    batch draws the same scales, so S = 0 is the paper's degradation."""
    from tfsdeploy.fusion import fuse_condition
    from tfsdeploy.imaging import degrade
    from tfsdeploy.inputs import as_triplet, make_condition

    samples = open_split(synth_dataset, "train", 64).load()
    plain = make_batch(samples, [0, 3], [2, 4], 0, np.random.default_rng(5))
    bp = make_batch(samples, [0, 3], [2, 4], 0, np.random.default_rng(5), backproject=1.5)
    assert bp.scales == plain.scales
    for i, n in enumerate([0, 3]):
        hr = samples[n].hr.float() / 255
        want, _ = make_condition(as_triplet(hr[0:1], hr[1:2], hr[2:5]), bp.scales[i], 64, 1.5)
        torch.testing.assert_close(bp.cond01[i], want[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(bp.base01[i], fuse_condition(want)[0], atol=1e-6, rtol=0)
        assert torch.equal(bp.gt01[i], plain.gt01[i])
        assert not torch.allclose(bp.cond01[i], degrade(hr[None, :5], bp.scales[i])[0], atol=1e-3)


@pytest.mark.parametrize("scales,crop,bp", [([2], 64, 0), ([4], 32, 0), ([8], 64, 0), ([2, 4, 8], 100, 0), ([8], 200, 0),
                                             ([4], 32, 0.75), ([8], 64, 1.5), ([2, 4, 8], 64, 2)])
def test_a_crop_made_in_a_window_equals_the_crop_of_the_whole_image(scales, crop, bp, monkeypatch):
    """make_batch degrades and fuses a crop inside windows around it; the margins cover the
    degradation's, the back-projection's and the fusion's reach, so the pixels equal those of
    processing the whole image (crops at the borders included)."""
    import tfsdeploy.data.batches as batches

    hr = (torch.rand(12, 8, 256, 256, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    windowed = [make_batch(hr, range(12), scales, crop, np.random.default_rng(s), augment, bp) for s in range(3)]
    monkeypatch.setattr(batches, "DEGRADE_MARGIN", 10**6)
    monkeypatch.setattr(batches, "FUSE_MARGIN", 10**6)
    for s, w in enumerate(windowed):
        whole = make_batch(hr, range(12), scales, crop, np.random.default_rng(s), augment, bp)
        assert w.scales == whole.scales and w.cond01.shape == (12, 5, crop, crop)
        for a, b in ((w.cond01, whole.cond01), (w.base01, whole.base01), (w.gt01, whole.gt01)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def _varied(monkeypatch, **ranges):
    import tfsdeploy.data.batches as batches

    for name, value in ranges.items():
        monkeypatch.setattr(batches, name, value)
    return batches


@pytest.mark.parametrize("scales,crop,bp", [([2], 64, 0), ([8], 64, 1.5), ([2, 4, 8], 100, 0)])
def test_a_varied_crop_made_in_a_window_equals_the_crop_of_the_whole_image(scales, crop, bp, monkeypatch):
    """The blur of the varied degradation reaches further than bicubic; the windows still cover it
    (noise off: a window draws its noise on its own grid, which is another draw of the same law)."""
    batches = _varied(monkeypatch, VARIED_NOISE=(0.0, 0.0), VARIED_PLAIN=0.25)
    hr = (torch.rand(12, 8, 256, 256, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    windowed = [make_batch(hr, range(12), scales, crop, np.random.default_rng(s), None, bp, "varied") for s in range(2)]
    monkeypatch.setattr(batches, "DEGRADE_MARGIN", 10**6)
    monkeypatch.setattr(batches, "FUSE_MARGIN", 10**6)
    for s, w in enumerate(windowed):
        whole = make_batch(hr, range(12), scales, crop, np.random.default_rng(s), None, bp, "varied")
        for a, b in ((w.cond01, whole.cond01), (w.base01, whole.base01)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_varied_degradation_draws_plain_blurred_and_noisy_inputs(monkeypatch):
    """Each input is the paper's degradation (about half of them) or blurred, shrunk, noisy and
    8-bit: checked on the low-resolution pixels themselves (a nearest-neighbour upsampling stands in
    for the member's, so that every 'scale'-th pixel is one of them)."""
    import torch.nn.functional as F

    from tfsdeploy.imaging import degrade

    batches = _varied(monkeypatch)
    hr = torch.rand(40, 5, 64, 64, generator=torch.Generator().manual_seed(2))
    hr = F.avg_pool2d(F.interpolate(hr, scale_factor=2, mode="bilinear"), 2)  # some spatial correlation
    a = batches.degrade_varied(hr, 4, 0.0, np.random.default_rng(5))
    b = batches.degrade_varied(hr, 4, 0.0, np.random.default_rng(5))
    assert torch.equal(a, b) and a.shape == hr.shape  # a pure function of its draws
    plain = degrade(hr, 4)
    is_plain = [torch.equal(a[i], plain[i]) for i in range(40)]
    assert 10 <= sum(is_plain) <= 30  # VARIED_PLAIN = 0.5

    monkeypatch.setattr(batches, "upsample", lambda lr, size, bp: F.interpolate(lr, size=(size, size), mode="nearest"))
    monkeypatch.setattr(batches, "VARIED_PLAIN", 0.0)
    monkeypatch.setattr(batches, "VARIED_BLUR", (0.0, 0.0))
    monkeypatch.setattr(batches, "VARIED_KERNELS", ("bicubic",))
    monkeypatch.setattr(batches, "VARIED_NOISE", (0.02, 0.02))
    lr = batches.degrade_varied(hr, 4, 0.0, np.random.default_rng(6))[..., ::4, ::4]
    assert torch.equal(lr * 255, (lr * 255).round())  # 8-bit values
    clean = F.interpolate(hr, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    noise = lr - clean
    assert abs(float(noise.std()) - 0.02) < 0.002  # sigma 0.02, plus 8-bit rounding (1/255/sqrt(12))
    assert abs(float(noise.mean())) < 0.002

    monkeypatch.setattr(batches, "VARIED_NOISE", (0.0, 0.0))
    monkeypatch.setattr(batches, "VARIED_BLUR", (0.5, 0.5))
    blurred = batches.degrade_varied(hr, 4, 0.0, np.random.default_rng(6))[..., ::4, ::4]
    detail = lambda x: float((x[..., 1:] - x[..., :-1]).abs().mean())  # noqa: E731
    assert detail(blurred) < 0.8 * detail(clean)


def test_an_unknown_degradation_is_refused():
    from tfsdeploy.config import DataConfig

    with pytest.raises(UserError, match="degradation must be one of bicubic, varied"):
        DataConfig(degradation="gaussian")
