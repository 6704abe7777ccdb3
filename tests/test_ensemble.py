"""The geometric self-ensemble (tfsdeploy.ensemble) and `fuse --ensemble`."""

import numpy as np
import pytest
import torch

from tfsdeploy.ensemble import VIEWS, dihedral, fuse_views
from tfsdeploy.errors import UserError

from test_bundle import three  # noqa: F401  (fixture)


def numpy_view(a: np.ndarray, k: int) -> np.ndarray:
    """The same views written with numpy: k quarter turns counter-clockwise, then (k >= 4) a flip
    left-right."""
    out = np.rot90(a, k % 4, axes=(-2, -1))
    return out[..., ::-1] if k >= 4 else out


def test_the_eight_views_are_the_dihedral_group_and_each_inverse_undoes_its_view():
    x = torch.arange(2 * 5 * 6 * 6, dtype=torch.float32).reshape(2, 5, 6, 6)
    views = [dihedral(x, k) for k in range(VIEWS)]
    for k, v in enumerate(views):
        assert np.array_equal(v.numpy(), numpy_view(x.numpy(), k))
        assert torch.equal(dihedral(v, k, inverse=True), x)
    assert len({tuple(v[0, 0].flatten().tolist()) for v in views}) == VIEWS  # all distinct


def test_an_equivariant_fuse_gives_back_its_single_pass_and_a_biased_one_averages_its_bias():
    cond = torch.rand(2, 5, 8, 8)
    same = fuse_views(lambda batch, seeds: batch[:, :3] * 2, cond, None, per_call=16)
    assert torch.allclose(same, cond[:, :3] * 2, atol=1e-6)
    ramp = torch.linspace(0, 1, 8).expand(8, 8)  # a fuse that is not equivariant: it adds a ramp
    out = fuse_views(lambda batch, seeds: batch[:, :3] + ramp, cond, None, per_call=16)
    # each view's output is its view + the ramp; mapped back, the ramp is seen through each inverse
    undo = [np.rot90(ramp.numpy()[..., ::-1] if k >= 4 else ramp.numpy(), -(k % 4)) for k in range(VIEWS)]
    mean_ramp = sum(undo) / VIEWS
    assert np.allclose((out - cond[:, :3]).numpy(), np.broadcast_to(mean_ramp, (2, 3, 8, 8)), atol=1e-6)


@pytest.mark.parametrize("b, per_call, calls", [(1, 1, 8), (1, 8, 1), (2, 16, 1), (2, 4, 4), (3, 4, 8)])
def test_views_are_batched_as_the_call_size_allows_with_each_slices_seed(b, per_call, calls):
    cond = torch.rand(b, 5, 4, 4)
    seen = []

    def fuse(batch, seeds):
        seen.append((batch.shape[0], seeds))
        return batch[:, :3] + torch.tensor(seeds, dtype=torch.float32)[:, None, None, None]

    seeds = list(range(10, 10 + b))
    out = fuse_views(fuse, cond, seeds, per_call)
    assert len(seen) == calls and all(n <= max(per_call, b) for n, _ in seen)
    assert all(s == seeds * (n // b) for n, s in seen)  # each view of slice i gets seeds[i]
    assert torch.allclose(out, cond[:, :3] + torch.tensor(seeds, dtype=torch.float32)[:, None, None, None])


def test_a_condition_that_is_not_square_is_refused():
    with pytest.raises(UserError, match="square"):
        fuse_views(lambda b, s: b[:, :3], torch.rand(1, 5, 4, 6), None, 8)


def test_a_pipeline_with_the_ensemble_averages_its_own_eight_fuses_and_the_cli_asks_for_it(tmp_path, three,  # noqa: F811
                                                                                          synth_dataset):
    from typer.testing import CliRunner

    from tfsdeploy.cli import app
    from tfsdeploy.config import EngineConfig, SampleConfig
    from tfsdeploy.imaging import read_image
    from tfsdeploy.pipeline import FusionPipeline

    engine = EngineConfig(engine="torch", device="cpu")
    pipe = FusionPipeline.load(three[4], 4, SampleConfig(steps=2, ensemble=True), engine)
    plain = FusionPipeline.load(three[4], 4, SampleConfig(steps=2), engine)
    assert "ensemble of 8 views" in pipe.describe() and "ensemble" not in plain.describe()
    cond = torch.rand(2, 5, 32, 32)
    by_hand = sum(dihedral(plain(dihedral(cond, k)), k, inverse=True) for k in range(VIEWS)) / VIEWS
    assert torch.allclose(pipe(cond), by_hand, atol=1e-5)
    assert not torch.allclose(pipe(cond), plain(cond), atol=1e-3)
    # a slice comes out the same alone or in a batch, as without the ensemble
    assert torch.allclose(pipe(cond[1:]), pipe(cond)[1:], atol=1e-5)

    trip = [synth_dataset / "test" / m / "e00.png" for m in ("t1", "t2", "func")]
    images = {}
    for name, extra in (("one", []), ("eight", ["--ensemble"])):
        res = CliRunner().invoke(app, [str(a) for a in ("fuse", *trip, "--scale", 4, "--model", three[4], "--steps", 2,
                                                        "--out", tmp_path / f"{name}.png", "--no-progress", *extra)])
        assert res.exit_code == 0, res.output
        assert ("ensemble of 8 views" in res.output) == (name == "eight")
        images[name] = read_image(tmp_path / f"{name}.png")
    assert images["one"].shape == images["eight"].shape and not torch.equal(images["one"], images["eight"])
