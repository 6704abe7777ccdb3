"""The synthetic source of `data build`: anatomy from the SPM label and tissue maps, MR contrasts that
follow the physics, determinism, and the dataset it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tfsdeploy.data import build_dataset
from tfsdeploy.data.spm import read_member, split_by_blocks
from tfsdeploy.data.synth import (AIR, BONE, CSF, GM, SOFT, WM, geometry, head_slices, lesion_masks, load_anatomy,
                                  mr_image, func_image, region_tissue, slice_seed, synth_triplet)
from tfsdeploy.errors import UserError
from tfsdeploy.fusion import fuse_trimodal
from tfsdeploy.imaging import read_image


@pytest.fixture(scope="module")
def anatomy():
    return load_anatomy(read_member)


@pytest.fixture(scope="module")
def mid_slice(anatomy):
    """A slice through the ventricles, at 128 px: its region map and each pixel's tissue class."""
    zs = head_slices(anatomy)
    z = zs[len(zs) // 2]
    index, regions = geometry(anatomy, z, 128, np.random.default_rng(0))
    tissue = region_tissue(anatomy, regions)
    return z, index, tissue, torch.from_numpy(tissue)[index]


def test_anatomy_is_one_grid_with_a_class_per_structure(anatomy):
    assert anatomy.labels.shape == anatomy.tpm.shape[1:]
    assert anatomy.tpm.shape[0] == 6
    np.testing.assert_allclose(anatomy.tpm.sum(0)[anatomy.labels > 0], 1.0, atol=0.02)  # probabilities
    assert len(anatomy.tissue_of) > 100  # the label map's brain structures
    assert set(anatomy.tissue_of.values()) == {GM, WM, CSF}
    zs = head_slices(anatomy)
    assert 60 <= len(zs) <= 110 and zs == sorted(zs)


def test_region_map_holds_brain_inside_skull_and_scalp_inside_air(mid_slice):
    _, _, _, cls = mid_slice
    n = cls.shape[0]
    assert int(cls[0, 0]) == int(cls[-1, -1]) == AIR  # corners (and padding) are air
    assert int(cls[n // 2, n // 2]) in (GM, WM, CSF)  # the middle is brain
    row = cls[n // 2].tolist()  # from the left edge inwards: air, then scalp, then bone, then brain
    first = {c: row.index(c) for c in (SOFT, BONE, GM) if c in row}
    assert first[SOFT] < first[BONE] < first[GM]
    for c in (GM, WM, CSF, BONE, SOFT):
        assert int((cls == c).sum()) > 20, c


def test_mr_contrasts_follow_tissue_physics(mid_slice):
    """T1: white > grey > CSF; T2: CSF > grey > white; every contrast: air darkest; noise in the air."""
    _, index, tissue, cls = mid_slice
    core = torch.zeros_like(cls, dtype=torch.bool)  # away from edges, where partial volume mixes classes
    for c in (GM, WM, CSF, AIR):
        m = (cls == c).float()[None, None]
        core |= (torch.nn.functional.avg_pool2d(m, 5, 1, 2)[0, 0] > 0.99) & (cls == c)
    far_air = torch.nn.functional.avg_pool2d((cls == AIR).float()[None, None], 13, 1, 6)[0, 0] > 0.999
    assert int(far_air.sum()) > 100
    for seed in range(3):
        rng = np.random.default_rng(seed)
        pairs = {c: mr_image(index, tissue, c, rng, []) for c in ("t1", "t2", "pd")}
        img = {c: noisy[0, 0] for c, (noisy, _) in pairs.items()}
        mean = {k: {c: float(v[core & (cls == c)].mean()) for c in (GM, WM, CSF, AIR)} for k, v in img.items()}
        assert mean["t1"][WM] > mean["t1"][GM] > mean["t1"][CSF], mean["t1"]
        assert mean["t2"][CSF] > mean["t2"][GM] > mean["t2"][WM], mean["t2"]
        for k, v in img.items():
            assert v.min() >= 0 and v.max() <= 1 and v.shape == cls.shape
            assert mean[k][AIR] < min(mean[k][GM], mean[k][WM]) / 3
            assert float(v[core & (cls == AIR)].std()) > 1e-3  # Rician noise, not a flat zero
            clean = pairs[k][1][0, 0]
            assert float(clean[far_air].abs().max()) < 1e-3  # ... which the noise-free twin lacks
            diff = v - clean  # same intensity scale: the two differ by the noise alone
            assert 1e-3 < float(diff[core & (cls == WM)].std()) < 0.06 and abs(float(diff[core & (cls == WM)].mean())) < 0.02


def test_lesions_lie_in_brain_and_darken_t1_brighten_t2(mid_slice):
    _, index, tissue, cls = mid_slice
    rng = np.random.default_rng(3)
    found = []
    for _ in range(20):
        found += lesion_masks(index, tissue, rng)
    assert found
    brain = ((cls == GM) | (cls == WM)).float()
    for mask, strength in found[:4]:
        m = mask[0, 0]
        assert 0.4 <= strength <= 1 and float(m.max()) > 0.5
        assert float((m * (1 - brain)).sum()) <= 0.2 * float(m.sum())  # soft edges may spill a little
        core = m > 0.5 * m.max()
        for contrast, sign in (("t1", -1), ("t2", 1)):
            a = mr_image(index, tissue, contrast, np.random.default_rng(9), [])[1][0, 0]
            b = mr_image(index, tissue, contrast, np.random.default_rng(9), [(mask, strength)])[1][0, 0]
            assert sign * float((b - a)[core].mean()) > 0.02, contrast


def test_functional_image_follows_grey_matter_and_spect_is_smoother_than_pet(mid_slice):
    _, index, tissue, cls = mid_slice
    imgs = {k: func_image(index, tissue, k, np.random.default_rng(1), [])[1][0, 0] for k in ("spect", "pet")}
    for v in imgs.values():
        assert float(v[cls == GM].mean()) > float(v[cls == WM].mean()) > float(v[cls == AIR].mean())

    def roughness(v):
        return float((v[1:] - v[:-1]).abs().mean() + (v[:, 1:] - v[:, :-1]).abs().mean())

    assert roughness(imgs["spect"]) < roughness(imgs["pet"])


def test_synth_triplet_is_a_pure_function_of_its_arguments(anatomy):
    z = head_slices(anatomy)[30]
    a, a_clean = synth_triplet(anatomy, z, "t1-t2-spect", 64, seed=0)
    b, b_clean = synth_triplet(anatomy, z, "t1-t2-spect", 64, seed=0)
    c, c_clean = synth_triplet(anatomy, z, "t1-t2-spect", 64, seed=1)
    for x, y, w in zip(a + a_clean, b + b_clean, c + c_clean):
        assert torch.equal(x, y)
        assert not torch.equal(x, w)
    t1, mr2, func = a
    assert t1.shape == mr2.shape == (1, 64, 64) and func.shape == (3, 64, 64)
    assert float((func[0] - func[2]).abs().mean()) > 0.02  # colour-mapped
    assert slice_seed(0, z, "t1-t2-spect") != slice_seed(0, z, "t1-pd-spect")


def test_build_writes_synth_slices_split_by_blocks_with_their_fusion_as_ground_truth(tmp_path, anatomy):
    out = tmp_path / "ds"
    summary = build_dataset(out, size=64, combos=["t1-pd-pet"], sources=["synth"])
    info = summary["sources"]["synth"]
    assert list(summary["sources"]) == ["synth"]
    assert info["slices"] == split_by_blocks(head_slices(anatomy))
    zs = {s: set(v) for s, v in info["slices"].items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not any(abs(x - y) <= 1 for x in zs[a] for y in zs[b])  # not even neighbours
    for split, n in summary["counts"].items():
        names = sorted(p.name for p in (out / split / "gt").iterdir())
        assert len(names) == n == len(zs[split])
        assert all(n.startswith("synth-t1-pd-pet_z") for n in names)
    name = sorted((out / "test" / "gt").iterdir())[0].name
    t1, pd, func, gt = (read_image(out / "test" / d / name) for d in ("t1", "t2", "func", "gt"))
    z = int(name.split("_z")[1][:3])
    want, clean = synth_triplet(anatomy, z, "t1-pd-pet", 64, seed=0)
    for got, w in zip((t1, pd, func), want):  # the sources as acquired, noise included, as 8 bits hold them
        assert float((got - w).abs().max()) <= 0.5 / 255 + 1e-6
    ref = fuse_trimodal(*(x[None] for x in clean))[0]  # the ground truth fuses the noise-free sources
    assert float((gt - ref).abs().max()) <= 0.5 / 255 + 1e-6
    noisy_ref = fuse_trimodal(*(x[None] for x in want))[0]
    assert float((gt - noisy_ref).abs().max()) > 2 / 255
    assert json.loads((out / "summary.json").read_text()) == summary


def test_unknown_or_no_sources_are_refused(tmp_path):
    with pytest.raises(UserError, match="unknown source"):
        build_dataset(tmp_path / "a", size=64, sources=["spm", "harvard"])
    with pytest.raises(UserError, match="at least one source"):
        build_dataset(tmp_path / "b", size=64, sources=[" "])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
