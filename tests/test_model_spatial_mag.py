"""Spatial-magnification attention model: presets, training signal, streamed trace geometry."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

from engines import registry
from engines.models import spatial_mag as sm
from engines.sampling import Orientation, SlideView
from engines.slide import Slide
from engines.trace import AttentionMap, Field, Progress, TrailStep
from tests.conftest import DEMO_SLIDE, GOOD_SLIDES

ROI = (600.0, 900.0, 640.0, 480.0)  # a landscape piece of the demo slide: quick to read


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def demo_slide():
    with Slide(DEMO_SLIDE) as slide:
        yield slide


def _model(**overrides) -> sm.SpatialMagNet:
    torch.manual_seed(0)
    return registry.create("spatial_mag", "tiny", **overrides)


def _explain(model, view, seed=1):
    events = []
    torch.manual_seed(seed)
    model.eval()
    probs = model.explain(view, events.append)
    return probs, events


# -- presets and config ----------------------------------------------------------------------
def test_presets_build_with_the_papers_sizes():
    tiny = registry.create("spatial_mag", "tiny")
    paper = registry.create("spatial_mag", "paper")
    assert isinstance(paper, sm.SpatialMagNet) and paper.name == "spatial_mag"
    cfg = paper.config
    assert cfg.backbone == "inception_v3" and cfg.thumb_size == (299, 224) and cfg.patch_size == 299
    assert cfg.grids == ((2, 2), (3, 4), (6, 7)) and cfg.k == 5 and cfg.entropy_weight == 0.01
    # Two Inception V3 trunks (no fc), three 1x1 attention convs, one linear classifier.
    ref = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    trunk = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("fc."))
    n = sum(p.numel() for p in paper.parameters())
    assert n == 2 * trunk + 3 * (2048 + 1) + 2048 * 2 + 2
    assert sum(p.numel() for p in paper.backbone_parameters()) == 2 * trunk
    assert sum(p.numel() for p in tiny.parameters()) < 1_000_000


def test_bad_config_and_label_are_refused(demo_slide):
    with pytest.raises(ValueError, match="backbone"):
        registry.create("spatial_mag", "tiny", backbone="vgg")
    with pytest.raises(ValueError, match="grids"):
        registry.create("spatial_mag", "tiny", grids=())
    with pytest.raises(ValueError, match="at least 75"):
        registry.create("spatial_mag", "paper", patch_size=40)
    with pytest.raises(ValueError, match="k "):
        registry.create("spatial_mag", "tiny", k=0)
    with pytest.raises(ValueError, match="label"):
        _model().training_step(SlideView(demo_slide, roi=ROI), 2)


# -- training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("replace", [False, True])
def test_forward_shapes_and_loss_terms(demo_slide, replace):
    model = _model(replace=replace).train()
    view = SlideView(demo_slide, roi=ROI, orientation=Orientation(flip=True, rot90=1))
    torch.manual_seed(0)
    out = model.training_step(view, 1)
    assert out.logits.shape == (2,) and out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert {"ce", "entropy", "loss"} <= set(out.parts)
    # R = sum P log P lies in [-log N, 0] for N cells.
    n_cells = sum(r * c for r, c in model.config.grids)
    assert -math.log(n_cells) - 1e-4 <= out.parts["entropy"] <= 0
    shares = [out.parts[f"attention_mag{j}"] for j in (1, 2, 3)]
    assert abs(sum(shares) - 1) < 1e-5
    assert out.parts["loss"] == pytest.approx(out.parts["ce"] + 0.01 * out.parts["entropy"], rel=1e-5)
    three = registry.create("spatial_mag", "tiny", classes=["a", "b", "c"])
    assert three.training_step(view, 2).logits.shape == (3,)


def test_gradients_reach_attention_through_the_sampling_estimator(demo_slide):
    # No entropy term and no dropout: the attention heads learn only through the estimator.
    model = _model(entropy_weight=0.0, attention_dropout=0.0).train()
    torch.manual_seed(0)
    model.training_step(SlideView(demo_slide, roi=ROI), 1).loss.backward()
    for part in (model.attention, model.h, model.f, model.classifier):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_a_few_optimisation_steps_lower_the_loss(demo_slide):
    model = _model(attention_dropout=0.0, classifier_dropout=0.0).train()
    view = SlideView(demo_slide, roi=ROI)
    opt = model.make_optimizer(lr=3e-3)

    def loss() -> torch.Tensor:
        torch.manual_seed(7)  # the same draws each time: a fixed batch
        return model.training_step(view, 1).loss

    start = float(loss().detach())
    for _ in range(4):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss().detach()) < start - 0.05


def test_attention_dropout_zeroes_cells_and_keeps_a_distribution():
    model = _model(attention_dropout=0.5)
    p = torch.softmax(torch.randn(58, requires_grad=True), 0)
    torch.manual_seed(3)
    q = model._drop(p)
    q = q.detach()
    assert int((q == 0).sum()) > 10 and abs(float(q.sum()) - 1) < 1e-5
    kept = q > 0
    # Kept cells keep their relative weights.
    assert torch.allclose(q[kept] / q[kept].sum(), p[kept] / p[kept].sum())


# -- trace --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", GOOD_SLIDES, ids=lambda p: p.name)
def test_trace_geometry_and_streaming_order(path):
    model = _model()
    with Slide(path) as slide:
        view = SlideView(slide)
        probs, events = _explain(model, view)
        sw, sh = slide.width, slide.height
    bounds = view.bounds
    assert isinstance(events[0], Field) and events[0].id == 0 and events[0].kind == "view"
    assert events[0].rect == bounds and events[0].parent is None

    # Progress streams: before the first patch, non-decreasing, and ends complete.
    kinds = [type(e) for e in events]
    progress = [e for e in events if isinstance(e, Progress)]
    assert kinds.index(Progress) < kinds.index(TrailStep)
    assert [p.done for p in progress] == sorted(p.done for p in progress)
    assert progress[-1].done == progress[-1].total and all(p.stage for p in progress)

    maps = [e for e in events if isinstance(e, AttentionMap)]
    grids = [tuple(g) for g in model.config.grids]
    if sh > sw:  # portrait: the landscape grids are transposed
        grids = [(c, r) for r, c in grids]
    assert [m.shape for m in maps] == grids
    total = 0.0
    for m in maps:
        assert m.group == "magnification"
        x, y, w, h = m.rect  # the cells tile the view exactly
        assert np.allclose((x, y, w, h), bounds, atol=1e-6)
        assert 0 <= x and 0 <= y and x + w <= sw + 1e-6 and y + h <= sh + 1e-6
        assert all(v >= 0 for row in m.values for v in row)
        total += sum(map(sum, m.values))
    assert total == pytest.approx(1.0, abs=1e-5)
    mags = [m.magnification for m in maps]
    if mags[0] is not None:  # finer grids, higher magnification
        assert mags == sorted(mags) and mags[0] < mags[-1]

    fields = [e for e in events if isinstance(e, Field)]
    patches = fields[1:]
    assert len(patches) == model.config.k and len({f.id for f in fields}) == len(fields)
    for f in patches:
        assert f.kind == "patch" and f.parent == 0 and events[0].contains(f)
        m = maps[f.depth - 1]  # depth 1 + magnification index
        col = round((f.rect[0] - m.origin[0]) / m.cell[0])
        row = round((f.rect[1] - m.origin[1]) / m.cell[1])
        assert np.allclose(f.rect, m.cell_rect(row, col), atol=1e-6)  # exactly one cell
        assert f.score == pytest.approx(m.values[row][col])
        assert f.magnification == m.magnification
        x, y, w, h = f.rect
        assert x >= -1 and y >= -1 and x + w <= sw + 1 and y + h <= sh + 1
    # Without replacement: k distinct cells.
    assert len({f.rect for f in patches}) == len(patches)

    trail = [e for e in events if isinstance(e, TrailStep)]
    assert [t.index for t in trail] == list(range(len(patches)))
    position = {id(e): i for i, e in enumerate(events)}
    by_id = {f.id: f for f in fields}
    for t in trail:
        assert position[id(by_id[t.field_id])] < position[id(t)]  # the field streams first
        assert sum(t.probs) == pytest.approx(1.0, abs=1e-5)
    assert probs == trail[-1].probs and len(probs) == 2


def test_seeded_runs_repeat_and_seeds_matter(demo_slide):
    model = _model()
    view = SlideView(demo_slide, roi=ROI)
    a = _explain(model, view, seed=3)
    b = _explain(model, view, seed=3)
    assert a == b
    runs = [_explain(model, view, seed=s)[1] for s in range(4)]
    draws = {tuple(e.rect for e in events if isinstance(e, Field)) for events in runs}
    assert len(draws) > 1
    model.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(5)
        losses.append(float(model.training_step(view, 0).loss.detach()))
    assert losses[0] == losses[1]


def test_cancellation_from_emit_propagates(demo_slide):
    class Stop(Exception):
        pass

    seen = []

    def emit(event):
        seen.append(event)
        if isinstance(event, TrailStep):
            raise Stop

    with pytest.raises(Stop):
        _model().eval().explain(SlideView(demo_slide, roi=ROI), emit)
    assert sum(isinstance(e, TrailStep) for e in seen) == 1


def test_bounded_reads_tile_the_output_like_one_read(demo_slide, monkeypatch):
    view = SlideView(demo_slide, roi=ROI)
    whole = view.read(ROI, 96, 72)
    calls = []
    real = SlideView.read

    def counting(self, rect, w, h):
        calls.append(rect)
        return real(self, rect, w, h)

    monkeypatch.setattr(SlideView, "read", counting)
    monkeypatch.setattr(sm, "MAX_READ_PIXELS", 200 * 200)
    pieces = sm.read_bounded(view, ROI, 96, 72)
    assert pieces.shape == whole.shape and len(calls) >= 9
    # Every piece lies inside the requested rectangle.
    x, y, w, h = ROI
    eps = 1e-6
    assert all(r[0] >= x - eps and r[1] >= y - eps and r[0] + r[2] <= x + w + eps
               and r[1] + r[3] <= y + h + eps for r in calls)
    assert np.abs(pieces.astype(int) - whole.astype(int)).mean() < 6
