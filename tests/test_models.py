"""SSL-SoilNet parts: shapes and gradients, NT-Xent against a direct computation, the pinball loss."""

from __future__ import annotations

import math

import pytest
import torch

from geosoc.learn import baselines
from geosoc.learn.models import NetworkConfig, SoilNet
from geosoc.learn.models.climate import ClimateEncoder, sinusoidal_positions
from geosoc.learn.models.image import ImageEncoder, centre_statistics
from geosoc.learn.models.losses import nt_xent, pinball

TINY = dict(patch_size=16, months=6, image_patch=4, image_dim=32, image_depth=1, image_heads=2, climate_dim=32,
            climate_layers=1, climate_heads=2, climate_feedforward=64, embedding=16, head_hidden=16)


def batch(n: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"patch": torch.randn(n, 3, 16, 16), "climate": torch.randn(n, 6, 2)}


def test_image_encoder_shapes_and_gradients() -> None:
    encoder = ImageEncoder(bands=3, size=16, patch=4, dim=32, depth=1, heads=2, embedding=16)
    x = torch.randn(5, 3, 16, 16, requires_grad=True)
    out = encoder(x)
    assert out.shape == (5, 16)
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in encoder.parameters() if p.requires_grad)


def test_climate_encoder_shapes_and_positions() -> None:
    encoder = ClimateEncoder(variables=2, months=6, dim=32, layers=1, heads=2, feedforward=64, embedding=16)
    assert encoder(torch.randn(3, 6, 2)).shape == (3, 16)
    table = sinusoidal_positions(6, 32)
    assert table.shape == (6, 32) and torch.allclose(table[0, 1::2], torch.ones(16))
    assert math.isclose(float(table[1, 0]), math.sin(1.0), rel_tol=1e-6)


def test_paper_size_model_builds() -> None:
    model = SoilNet(NetworkConfig(bands=["b"] * 14, variables=["v"] * 14))
    params = sum(p.numel() for p in model.parameters())
    assert 90e6 < params < 110e6  # ViT-B/8 (~86M) + climate Transformer (~13M) + heads


@pytest.mark.parametrize("bands,variables", [(["a", "b", "c"], ["x", "y"]), (["a", "b", "c"], []), ([], ["x", "y"])])
def test_soilnet_with_either_or_both_branches(bands, variables) -> None:
    model = SoilNet(NetworkConfig(bands=bands, variables=variables, **TINY))
    out = model(batch())
    assert out.shape == (4, 3)
    assert (out[:, 0] <= out[:, 1]).all() and (out[:, 1] <= out[:, 2]).all()  # quantiles never cross
    out.sum().backward()
    assert set(model.embed(batch())) == ({"image"} if not variables else {"climate"} if not bands else {"image", "climate"})


@pytest.mark.parametrize("variables", [["x", "y"], []])
def test_the_head_reads_the_centre_pixel_as_the_trees_see_it(variables) -> None:
    """The head's extra inputs are the trees' centre and window features (NaN, i.e. no data, as 0), and the
    network's output moves with the centre pixel alone."""
    inputs = batch()
    inputs["patch"][0, 1, 6:9, 7] = torch.nan  # no data beside the centre and at it
    expected = baselines.covariate_features({"patch": inputs["patch"].numpy()}, ["a", "b", "c"], [], None).values
    torch.testing.assert_close(centre_statistics(inputs["patch"]), torch.nan_to_num(torch.from_numpy(expected)))
    model = SoilNet(NetworkConfig(bands=["a", "b", "c"], variables=variables, centre_pixel=True, **TINY)).eval()
    assert model.features(inputs).shape == (4, 16 * (1 + bool(variables)) + 6)
    moved = {k: v.clone() for k, v in inputs.items()}
    moved["patch"][:, :, 8, 8] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model.features(inputs)[:, -6:], model.features(moved)[:, -6:])


def test_model_needs_a_branch() -> None:
    with pytest.raises(ValueError):
        SoilNet(NetworkConfig(**TINY))


def test_nt_xent_matches_direct_computation() -> None:
    torch.manual_seed(1)
    a, b, t = torch.randn(3, 5), torch.randn(3, 5), 0.5
    z = torch.cat([a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)])
    n, total = 3, 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        numerator = math.exp(float(z[i] @ z[positive]) / t)
        denominator = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(numerator / denominator)
    assert math.isclose(float(nt_xent(a, b, t)), total / (2 * n), rel_tol=1e-5)


def test_nt_xent_rewards_aligned_views() -> None:
    torch.manual_seed(2)
    a = torch.randn(16, 8)
    assert nt_xent(a, a + 0.01 * torch.randn(16, 8), 0.5) < nt_xent(a, torch.randn(16, 8), 0.5)


def test_pinball_loss() -> None:
    q = torch.tensor([0.1, 0.5, 0.9])
    prediction = torch.tensor([[0.0, 0.0, 0.0]])
    target = torch.tensor([1.0])
    # under-prediction by 1 costs q for each quantile
    assert math.isclose(float(pinball(prediction, target, q)), (0.1 + 0.5 + 0.9) / 3, rel_tol=1e-6)
    assert math.isclose(float(pinball(prediction + 2, target, q)), (0.9 + 0.5 + 0.1) / 3, rel_tol=1e-6)
