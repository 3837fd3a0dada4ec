"""Grid attention model: shapes, the paper's attention maths, training, streaming traces."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engines import registry
from engines.models import grid_attention as ga
from engines.sampling import Orientation, SlideView
from engines.slide import Slide
from engines.trace import AttentionMap, Field, Progress, SlideRef, Trace
from tests.conftest import DEMO_SLIDE, GOOD_SLIDES, DATA

# A 512 x 512 patch of the demo slide with tissue, cut into 4 x 4 tiles of 128 px.
ROI = (1000.0, 1200.0, 512.0, 512.0)


def tiny(**overrides) -> ga.GridAttention:
    torch.manual_seed(0)
    return registry.create("grid_attention", "tiny", **overrides)


def small_view() -> SlideView:
    return SlideView(Slide(DEMO_SLIDE), roi=ROI)


class Cancelled(Exception):
    pass


# -- building ------------------------------------------------------------------------------
def test_presets_build_with_paper_sizes():
    model = tiny()
    assert model.name == "grid_attention" and model.classes == ["normal", "tumor"]
    assert sum(p.numel() for p in model.parameters()) < 200_000
    paper = registry.create("grid_attention", "paper", classes=["a", "b", "c", "d"])
    assert paper.config.filters == 64 and paper.config.dropout == 0.5
    assert tuple(paper.attention.weight.shape) == (64, 512, 3, 3)
    assert paper.fc.in_features == 64 * 512 and paper.fc.out_features == 4
    n = sum(p.numel() for p in paper.parameters())
    assert 11_000_000 < n < 12_500_000  # ResNet-18 trunk + 64 filters + classifier
    # All residual blocks but the last are frozen; the optimiser only sees trainable ones.
    assert not any(p.requires_grad for p in paper.trunk.stem.parameters())
    assert all(p.requires_grad for p in paper.trunk.tail.parameters())
    opt_ids = {id(p) for g in paper.make_optimizer(1e-3).param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in paper.trunk.stem.parameters()}
    assert {id(p) for p in paper.backbone_parameters()} == {id(p) for p in paper.trunk.parameters()}


@pytest.mark.parametrize("bad", [{"backbone": "vgg"}, {"filters": 0}, {"kernel": 2},
                                 {"dropout": 1.0}, {"batch_size": 0},
                                 {"sharpen_weight": -0.1}])
def test_bad_config_is_refused_with_a_message(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        registry.create("grid_attention", "tiny", **bad)


def test_paper_preset_runs_one_tile_and_scales_tiles_by_magnification():
    torch.manual_seed(0)
    paper = registry.create("grid_attention", "paper").eval()
    events = []
    probs = paper.explain(SlideView(Slide(DATA / "small.svs")), events.append)
    assert len(probs) == 2 and math.isclose(sum(probs), 1.0, rel_tol=1e-5)
    maps = [e for e in events if isinstance(e, AttentionMap)]
    assert len(maps) == 64 and all(m.values == [[1.0]] for m in maps)
    # 492 px at 20x: level-0 side doubles on a 40x slide, stays on a 20x one.
    assert paper.tile_side(SlideView(Slide(DEMO_SLIDE))) == pytest.approx(492.0)
    assert paper.tile_side(SlideView(Slide(DATA / "test3-DAPI-2.ndpi"))) == pytest.approx(984.0)


# -- the paper's maths ---------------------------------------------------------------------
def test_attention_conv_is_the_papers_3d_filter():
    torch.manual_seed(1)
    model = tiny()
    n, m = model.trunk.out_dim, model.config.filters
    u = torch.randn(n, 5, 7)
    ours = model.attention(u[None])[0]
    # m filters of size N x 3 x 3 over the (N, H', W') volume, zero padding (0, 1, 1).
    conv3d = F.conv3d(u[None, None], model.attention.weight[:, None], model.attention.bias,
                      padding=(0, 1, 1))
    assert conv3d.shape == (1, m, 1, 5, 7)
    torch.testing.assert_close(ours, conv3d[0, :, 0], rtol=1e-4, atol=1e-4)


def test_head_shapes_softmax_and_masking():
    torch.manual_seed(2)
    model = tiny().eval()
    n, m = model.trunk.out_dim, model.config.filters
    u = torch.randn(n, 3, 4)
    keep = [0, 1, 5, 6, 11]
    logits, alpha = model.head(u, keep)
    assert logits.shape == (2,) and alpha.shape == (m, 3, 4)
    flat = alpha.reshape(m, -1)
    torch.testing.assert_close(flat.sum(1), torch.ones(m))
    dropped = [i for i in range(12) if i not in keep]
    assert torch.all(flat[:, dropped] == 0) and torch.all(flat[:, keep] > 0)
    # eq. 2 by hand: z_k = sum_ij alpha_k,ij U_:,ij, concatenated, then the classifier.
    z = torch.stack([(u * alpha[k]).sum(dim=(1, 2)) for k in range(m)])
    torch.testing.assert_close(logits, model.fc(z.reshape(-1)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bounds,side", [((0, 0, 2220, 2967), 256), ((10.5, 3, 16, 16), 256),
                                         ((100, 200, 1000, 90), 300)])
def test_grid_fills_the_view_exactly(bounds, side):
    g = ga.make_grid(bounds, side)
    first, last = g.rect(0), g.rect(g.count - 1)
    assert first[:2] == pytest.approx(bounds[:2])
    assert last[0] + last[2] == pytest.approx(bounds[0] + bounds[2])
    assert last[1] + last[3] == pytest.approx(bounds[1] + bounds[3])
    assert 2 / 3 <= g.cell[0] / side <= 2 or g.cols == 1


class _FakeView:
    def __init__(self, img: np.ndarray) -> None:
        self.img = img

    def thumbnail(self, max_side: int) -> np.ndarray:
        return self.img


def test_tissue_fractions_follow_the_mask():
    img = np.full((64, 64, 3), 255, np.uint8)
    img[:, 32:] = (200, 100, 150)  # stained right half
    img[:16, 32:48] = 255  # one blank quarter of the tile in row 0, col 2
    frac = ga.tissue_fractions(_FakeView(img), ga.make_grid((0, 0, 400, 400), 100)).reshape(4, 4)
    np.testing.assert_allclose(frac[:, :2], 0.0)
    np.testing.assert_allclose(frac[1:, 2:], 1.0)
    assert frac[0, 2] == pytest.approx(0.0) and frac[0, 3] == pytest.approx(1.0)


# -- training ------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_reaches_attention():
    model = tiny(tile_size=128.0, scale_jitter=0.0, dropout=0.0).train()
    view = small_view()
    opt = model.make_optimizer(3e-3)
    losses = []
    for step in range(6):
        opt.zero_grad()
        out = model.training_step(view, 1)
        assert out.logits.shape == (2,) and set(out.parts) == {"ce"}
        out.loss.backward()
        if step == 0:
            for name in ("attention.weight", "fc.weight"):
                grad = dict(model.named_parameters())[name].grad
                assert grad is not None and grad.abs().sum() > 0, name
            tail = [p.grad for p in model.trunk.tail.parameters()]
            assert all(g is not None for g in tail) and sum(g.abs().sum() for g in tail) > 0
        opt.step()
        losses.append(float(out.loss.detach()))
    assert model.last_grid.count == 16
    assert losses[-1] < losses[0] - 0.05


def test_sharpening_term_is_the_maps_entropy_and_narrows_them():
    assert float(ga.normalised_entropy(torch.full((2, 8), 1 / 8), 8)) == pytest.approx(1.0)
    assert float(ga.normalised_entropy(torch.eye(8)[:2], 8)) == pytest.approx(0.0, abs=1e-6)
    view = small_view()
    entropies = {}
    for weight in (0.0, 2.0):
        model = tiny(tile_size=128.0, scale_jitter=0.0, dropout=0.0, sharpen_weight=weight).train()
        opt = model.make_optimizer(3e-3)
        for _ in range(6):
            opt.zero_grad()
            out = model.training_step(view, 1)
            out.loss.backward()
            opt.step()
        if weight:
            assert out.parts["loss"] == pytest.approx(out.parts["ce"] + weight * out.parts["entropy"],
                                                      rel=1e-5)
        with torch.no_grad():
            grid, _, keep = model.plan(view)
            _, alpha = model.head(model.feature_grid(ga._TileFeatures(model, view, grid, keep)), keep)
        entropies[weight] = float(ga.normalised_entropy(alpha.reshape(alpha.shape[0], -1), len(keep)))
    assert entropies[2.0] < entropies[0.0] - 0.02


def test_streamed_backward_equals_keeping_activations():
    view = small_view()
    grads, stats = [], []
    for stream in (True, False):
        # ResNet-18, whose BatchNorm statistics the recompute must leave alone (the small
        # trunk uses GroupNorm, which keeps none).
        torch.manual_seed(0)
        model = tiny(backbone="resnet18", tile_px=64, tile_size=128.0, scale_jitter=0.0, dropout=0.0,
                     batch_size=5, stream_backward=stream, freeze_early=True).train()
        model.training_step(view, 0).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        bn = [m for m in model.trunk.tail.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        stats.append(bn[0].running_mean.clone())
        assert model.tiles_processed == 16  # forward only: the recompute is not counted
    assert set(grads[0]) == set(grads[1])
    assert not any(n.startswith("trunk.stem") for n in grads[0])  # frozen stem
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)
    # The recompute pass leaves BatchNorm statistics as one forward pass would.
    torch.testing.assert_close(stats[0], stats[1])


def test_training_accepts_rotated_views_and_checks_the_label():
    model = tiny(tile_size=128.0).train()
    view = SlideView(Slide(DEMO_SLIDE), roi=(1000, 1200, 512, 384), orientation=Orientation(True, 1))
    out = model.training_step(view, 0)
    g = model.last_grid
    assert torch.isfinite(out.loss)
    # The grid is laid on the view's own (turned) rectangle: 384 wide, 512 high.
    assert g.origin == (1000.0, 1200.0)
    assert (g.cols * g.cell[0], g.rows * g.cell[1]) == (pytest.approx(384), pytest.approx(512))
    with pytest.raises(ValueError, match="label"):
        model.training_step(view, 2)


def test_seeded_training_repeats():
    view = small_view()
    runs = []
    for _ in range(2):
        model = tiny(tile_size=128.0).train()  # jitter and dropout draw from the seeded RNG
        out = model.training_step(view, 1)
        out.loss.backward()
        runs.append((float(out.loss.detach()), model.last_grid.cell, model.fc.weight.grad.clone()))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    torch.testing.assert_close(runs[0][2], runs[1][2], rtol=0, atol=0)


# -- inference traces ----------------------------------------------------------------------
def _check_trace(events, view: SlideView, model: ga.GridAttention) -> None:
    x0, y0, w0, h0 = view.bounds
    sw, sh = view.slide.width, view.slide.height
    first = events[0]
    assert isinstance(first, Field) and first.id == 0 and first.parent is None
    assert first.rect == view.bounds and first.kind == "view"
    fields = {e.id: e for e in events if isinstance(e, Field)}
    assert len(fields) == sum(isinstance(e, Field) for e in events)  # unique ids
    for f in fields.values():
        x, y, w, h = f.rect
        assert x >= -1 and y >= -1 and x + w <= sw + 1 and y + h <= sh + 1, f
        if f.parent is not None:
            assert fields[f.parent].contains(f) and f.depth == fields[f.parent].depth + 1
    maps = [e for e in events if isinstance(e, AttentionMap)]
    assert [m.name for m in maps] == [f"filter {k}" for k in range(model.config.filters)]
    g = model.last_grid
    for m in maps:
        assert m.group == "filter" and m.shape == (g.rows, g.cols)
        assert m.rect == pytest.approx((x0, y0, w0, h0))
        assert all(isinstance(v, float) and v >= 0 for row in m.values for v in row)
        assert sum(map(sum, m.values)) == pytest.approx(1.0, abs=1e-5)
    tiles = [f for f in fields.values() if f.kind == "tile"]
    assert len(tiles) == model.tiles_processed
    for f in tiles:  # tile fields are exactly the map cells
        r, c = divmod(f.id - 1, g.cols)
        assert f.rect == pytest.approx(maps[0].cell_rect(r, c))
    # Streaming: progress arrives while tiles are worked on, before the maps, and ends done.
    kinds = [type(e).__name__ for e in events]
    progress = [e for e in events if isinstance(e, Progress)]
    assert kinds.index("Progress") < kinds.index("AttentionMap")
    if tiles:
        assert kinds.index("Field", 1) < kinds.index("AttentionMap")
    assert progress[-1].done == progress[-1].total and isinstance(events[-1], Progress)
    dones = [p.done for p in progress if p.stage.startswith("tile")]
    assert dones == sorted(dones) and dones[-1] == model.tiles_processed


@pytest.mark.parametrize("path", GOOD_SLIDES, ids=lambda p: p.name)
def test_trace_geometry_on_real_slides(path):
    model = tiny().eval()
    view = SlideView(Slide(path))
    events = []
    probs = model.explain(view, events.append)
    assert len(probs) == 2 and math.isclose(sum(probs), 1.0, rel_tol=1e-5)
    _check_trace(events, view, model)


def test_background_tiles_are_skipped_and_get_no_attention():
    model = tiny().eval()
    view = SlideView(Slide(DEMO_SLIDE))
    events = []
    model.explain(view, events.append)
    g = model.last_grid
    assert 0 < model.tiles_processed < g.count  # the demo slide has blank glass
    tile_ids = {e.id - 1 for e in events if isinstance(e, Field) and e.kind == "tile"}
    amap = next(e for e in events if isinstance(e, AttentionMap))
    for i in range(g.count):
        r, c = divmod(i, g.cols)
        assert (amap.values[r][c] > 0) == (i in tile_ids)
    everything = tiny(skip_background=False).eval()
    everything.explain(view, lambda e: None)
    assert everything.tiles_processed == g.count


def test_roi_trace_stays_in_the_roi_and_is_deterministic():
    model = tiny(tile_size=128.0).eval()
    view = small_view()
    first, second = [], []
    p1 = model.explain(view, first.append)
    p2 = model.explain(view, second.append)
    _check_trace(first, view, model)
    assert p1 == p2 and first == second
    trace = Trace("grid_attention", "tiny", None, SlideRef(str(DEMO_SLIDE), 2220, 2967),
                  classes=list(model.classes), probs=p1)
    for event in first:
        trace.add(event)
    assert Trace.from_json(trace.to_json()) == trace  # plain finite floats only
    # A freshly seeded model gives the same run.
    assert tiny(tile_size=128.0).eval().explain(view, lambda e: None) == p1


def test_cancelling_emit_stops_the_run():
    model = tiny(tile_size=64.0, batch_size=4).eval()
    seen = []

    def emit(event):
        seen.append(event)
        if isinstance(event, Progress) and event.done >= 8:
            raise Cancelled()

    with pytest.raises(Cancelled):
        model.explain(small_view(), emit)
    assert model.tiles_processed < 64 and not any(isinstance(e, AttentionMap) for e in seen)


def test_too_many_tiles_is_a_clear_error():
    model = tiny(max_tiles=10).eval()
    with pytest.raises(ValueError, match="max_tiles"):
        model.explain(SlideView(Slide(DEMO_SLIDE)), lambda e: None)


def test_frozen_backbone_keeps_its_statistics_and_trains_the_head():
    model = tiny(tile_size=128.0).train()
    for p in model.backbone_parameters():  # what a fine-tune with a frozen backbone does
        p.requires_grad_(False)
    before = [b.clone() for b in model.trunk.buffers()]
    out = model.training_step(small_view(), 1)
    out.loss.backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.trunk.buffers()))
    assert model.attention.weight.grad is not None and model.fc.weight.grad is not None
    assert all(p.grad is None for p in model.trunk.parameters())
