"""What the five models share: one tile grid, one small CNN, one entropy, configs that check
themselves when made, and one way of refusing a bad label."""
from __future__ import annotations

import pytest
import torch

from engines import registry
from engines.grid import make_grid
from engines.models.blocks import SmallCNN, entropy
from engines.sampling import SlideView
from engines.slide import Slide
from tests.conftest import DEMO_SLIDE

# One setting per model that its config must refuse when the config is made.
BAD_SETTING = {
    "magnet": {"layers": 0},
    "spatial_mag": {"k": 0},
    "zoom_in": {"n_samples": 0},
    "grid_attention": {"kernel": 2},
    "local_learning": {"num_modules": 99},
}


def test_grid_fills_the_bounds_with_rounded_or_capped_cells():
    g = make_grid((10.0, 20.0, 1000.0, 250.0), 300.0)
    assert (g.rows, g.cols) == (1, 3) and g.cell == pytest.approx((1000 / 3, 250.0))
    c = make_grid((10.0, 20.0, 1000.0, 250.0), 300.0, fit="ceil")
    assert (c.rows, c.cols) == (1, 4) and max(c.cell) <= 300.0
    last = c.rect(c.count - 1)
    assert last[0] + last[2] == pytest.approx(1010.0) and last[1] + last[3] == pytest.approx(270.0)
    with pytest.raises(ValueError, match="positive"):
        make_grid((0, 0, 10, 10), 0)


def test_small_cnn_and_entropy():
    net = SmallCNN(4)
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 32, 4, 4)
    assert entropy(torch.full((8,), 1 / 8)).item() == pytest.approx(torch.log(torch.tensor(8.0)).item())
    assert entropy(torch.tensor([1.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("name", sorted(BAD_SETTING))
def test_every_config_checks_itself_when_made(name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        registry.config_for(name, "tiny", **BAD_SETTING[name])


@pytest.mark.parametrize("name", sorted(BAD_SETTING))
def test_every_model_refuses_a_bad_label_the_same_way(name):
    torch.manual_seed(0)
    model = registry.create(name, "tiny")
    with Slide(DEMO_SLIDE) as slide:
        view = SlideView(slide, roi=(600.0, 900.0, 512.0, 512.0))
        for bad in (2, -1, True, 1.0):
            with pytest.raises(ValueError, match=f"^{name}: label .* is not a class index"):
                model.training_step(view, bad)
