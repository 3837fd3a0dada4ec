"""Zoom-In network: presets, estimators, training signal and the streamed trace."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from engines import registry
from engines.models import zoom_in as zi
from engines.sampling import Orientation, SlideView
from engines.slide import Slide
from engines.trace import AttentionMap, Field, Progress, TrailStep
from tests.conftest import DEMO_SLIDE, GOOD_SLIDES

ROI = (600.0, 900.0, 512.0, 512.0)  # 2 x 2 tiles of the demo slide with the tiny preset


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def demo_slide():
    with Slide(DEMO_SLIDE) as slide:
        yield slide


def _model(**overrides) -> zi.ZoomInNet:
    torch.manual_seed(0)
    return registry.create("zoom_in", "tiny", **overrides)


def _run(model, view, seed=1):
    events = []
    torch.manual_seed(seed)
    model.eval()
    probs = model.explain(view, events.append)
    return probs, events


# -- presets -----------------------------------------------------------------------------
def test_presets_build_with_paper_sizes():
    tiny = registry.create("zoom_in", "tiny")
    paper = registry.create("zoom_in", "paper")
    assert isinstance(paper, zi.ZoomInNet) and paper.name == "zoom_in"
    cfg = paper.config
    assert (cfg.s1, cfg.s2, cfg.n_samples, cfg.subtile_size) == (1 / 32, 1 / 8, 100, 50)
    assert cfg.contrastive_warmup == 10 and cfg.entropy_weight == 1e-5
    assert paper.features.dim == 48
    n = sum(p.numel() for p in paper.parameters())
    # 2 attention stacks (3->8->8->1) + LeNet (3->36->48, 5x5) + linear 48->2
    att = (3 * 8 * 9 + 8) + (8 * 8 * 9 + 8) + (8 * 9 + 1)
    lenet = (3 * 36 * 25 + 36) + (36 * 48 * 25 + 48)
    assert n == 2 * att + lenet + 48 * 2 + 2
    assert sum(p.numel() for p in tiny.backbone_parameters()) == lenet


def test_bad_config_and_label_are_refused(demo_slide):
    with pytest.raises(ValueError, match="subtile_pixels"):
        registry.create("zoom_in", "tiny", subtile_pixels=8)
    with pytest.raises(ValueError, match="s1"):
        registry.create("zoom_in", "tiny", s1=0.0)
    with pytest.raises(ValueError, match="label"):
        _model().training_step(SlideView(demo_slide, roi=ROI), 5)


def test_feature_widths_train_and_round_trip(demo_slide, tmp_path):
    from engines.checkpoint import model_from_checkpoint, save_checkpoint

    model = _model(feature_channels=(8, 12))
    assert model.features.dim == 12
    # LeNet 3->8->12 with 5x5 convs: the backbone a fine-tune may freeze
    assert sum(p.numel() for p in model.backbone_parameters()) == (3 * 8 * 25 + 8) + (8 * 12 * 25 + 12)
    view = SlideView(demo_slide, roi=ROI)
    torch.manual_seed(0)
    model.training_step(view, 1).loss.backward()
    assert all(p.grad is not None for p in model.features.parameters())
    save_checkpoint(tmp_path / "z.pt", model)
    again = model_from_checkpoint(tmp_path / "z.pt", expect_model="zoom_in")
    assert again.config.feature_channels == (8, 12)
    assert _run(again, view)[0] == pytest.approx(_run(model, view)[0])
    for bad in ((8,), (8, 12, 16)):
        with pytest.raises(ValueError, match="feature_channels"):
            registry.create("zoom_in", "tiny", feature_channels=bad)


# -- the two-stage estimator ------------------------------------------------------------
def test_two_stage_estimate_and_gradients_are_unbiased_by_exact_enumeration():
    """N = 2 tiles drawn with replacement from alpha, then as many sub-tiles per tile drawn
    without replacement from its beta: averaged over every outcome, value and gradients
    equal those of eq. (5), sum_c alpha_c sum_c' beta_cc' f_cc'."""
    g = torch.Generator().manual_seed(3)
    alpha = torch.softmax(torch.randn(2, generator=g), 0).requires_grad_(True)
    betas = [torch.softmax(torch.randn(3, generator=g), 0).requires_grad_(True) for _ in range(2)]
    feats = torch.randn(2, 3, 2, generator=g)

    a, bs = alpha.detach(), [b.detach() for b in betas]

    def outcomes():
        for d in itertools.product(range(2), repeat=2):
            p_tiles = float(a[d[0]] * a[d[1]])
            if d[0] == d[1]:
                b = bs[d[0]]
                for seq in itertools.permutations(range(3), 2):
                    p = p_tiles * float(b[seq[0]] * b[seq[1]] / (1 - b[seq[0]]))
                    yield p, d, {d[0]: seq}
            else:
                for i, j in itertools.product(range(3), repeat=2):
                    p = p_tiles * float(bs[d[0]][i] * bs[d[1]][j])
                    yield p, d, {d[0]: (i,), d[1]: (j,)}

    mean = torch.zeros(2)
    total = 0.0
    for p, draws, positions in outcomes():
        est = {c: zi.expectation_without_replacement(betas[c], torch.tensor(q), feats[c][list(q)])
               for c, q in positions.items()}
        value = zi.two_stage_expectation(alpha, torch.tensor(draws), est)
        (p * value.sum()).backward()
        mean += p * value.detach()
        total += p
    exact = (alpha[:, None, None] * torch.stack(betas)[:, :, None] * feats).sum((0, 1))
    assert total == pytest.approx(1.0)
    assert torch.allclose(mean, exact.detach(), atol=1e-5)
    f = feats.sum(2)  # d/d(attention) of the summed output
    assert torch.allclose(alpha.grad, (torch.stack(betas) * f).sum(1).detach(), atol=1e-5)
    for c in range(2):
        assert torch.allclose(betas[c].grad, alpha[c].detach() * f[c], atol=1e-5)


# -- training ----------------------------------------------------------------------------
def test_forward_shapes_and_loss_terms(demo_slide):
    model = _model()
    view = SlideView(demo_slide, roi=ROI, orientation=Orientation(flip=True, rot90=1))
    torch.manual_seed(0)
    out = model.training_step(view, 0, epoch=0)
    assert out.logits.shape == (2,) and out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert "contrastive" not in out.parts and {"ce", "entropy", "loss"} <= set(out.parts)
    three = registry.create("zoom_in", "tiny", classes=["a", "b", "c"])
    assert three.training_step(view, 2).logits.shape == (3,)


@pytest.mark.parametrize("weighting", ["attention", "complement"])
def test_contrastive_term_only_for_positives_after_warmup(demo_slide, weighting):
    model = _model(contrastive_warmup=2, contrastive_weighting=weighting)
    view = SlideView(demo_slide, roi=ROI)
    assert "contrastive" not in model.training_step(view, 1, epoch=1).parts
    assert "contrastive" not in model.training_step(view, 0, epoch=5).parts
    out = model.training_step(view, 1, epoch=2)
    assert out.parts["contrastive"] > 0
    # The reference's contrastive pass has its own entropy term; the complement weighting none.
    spread = out.parts["entropy"] + out.parts.get("contrastive_entropy", 0.0)
    assert ("contrastive_entropy" in out.parts) == (weighting == "attention")
    assert out.parts["loss"] == pytest.approx(out.parts["ce"] + out.parts["contrastive"] - 1e-5 * spread, rel=1e-5)


def test_presets_weight_contrastive_estimators_as_documented():
    assert registry.create("zoom_in", "paper").config.contrastive_weighting == "attention"
    assert registry.create("zoom_in", "tiny").config.contrastive_weighting == "complement"
    with pytest.raises(ValueError, match="contrastive_weighting"):
        registry.create("zoom_in", "tiny", contrastive_weighting="beta")


@pytest.mark.parametrize("weighting", ["attention", "complement"])
def test_contrastive_estimators_are_weighted_as_configured(demo_slide, monkeypatch, weighting):
    """The reference draws contrastive sub-tiles from 1 - beta (tiles from 1 - alpha) but
    weights their estimators by beta and alpha; "complement" weights them by what they were
    drawn from."""
    drawn_from, weighted_by, tile_weights = [], [], []
    draw, estimate, aggregate = (zi.sample_without_replacement, zi.expectation_without_replacement,
                                 zi.two_stage_expectation)
    monkeypatch.setattr(zi, "sample_without_replacement",
                        lambda dist, k: drawn_from.append(dist.detach().clone()) or draw(dist, k))
    monkeypatch.setattr(zi, "expectation_without_replacement",
                        lambda a, i, f: weighted_by.append(a.detach().clone()) or estimate(a, i, f))
    monkeypatch.setattr(zi, "two_stage_expectation",
                        lambda a, d, t: tile_weights.append(a.detach().clone()) or aggregate(a, d, t))
    model = _model(contrastive_warmup=0, contrastive_weighting=weighting)
    torch.manual_seed(3)
    model.training_step(SlideView(demo_slide, roi=ROI), 1, epoch=0).loss.backward()
    assert len(drawn_from) == len(weighted_by) > 1 and len(tile_weights) == 2
    same = [torch.equal(d, w) for d, w in zip(drawn_from, weighted_by)]
    if weighting == "complement":
        assert all(same)
        assert torch.allclose(tile_weights[1], zi._complement(tile_weights[0]))
        return
    complement = [torch.allclose(d, zi._complement(w)) for d, w in zip(drawn_from, weighted_by)]
    assert any(same) and any(complement) and all(s or c for s, c in zip(same, complement))
    assert torch.equal(tile_weights[0], tile_weights[1])  # alpha for both passes


def test_entropy_term_spreads_attention_as_the_reference_does(demo_slide):
    """With the regulariser dominating, gradient steps raise the entropy of the attention
    (the reference adds strength x sum p log p); a penalty on entropy would lower it."""
    model = _model(entropy_weight=50.0)
    view = SlideView(demo_slide, roi=ROI)
    opt = model.make_optimizer(lr=1e-2)

    def entropy() -> float:
        torch.manual_seed(7)
        return model.training_step(view, 1).parts["entropy"]

    before = entropy()
    for _ in range(3):
        opt.zero_grad()
        torch.manual_seed(7)
        model.training_step(view, 1).loss.backward()
        opt.step()
    assert entropy() > before  # near its maximum already, so it can only rise a little


def test_gradients_reach_both_attention_stages(demo_slide):
    model = _model(entropy_weight=0.0)  # only the sampling estimators carry gradient now
    torch.manual_seed(0)
    model.training_step(SlideView(demo_slide, roi=ROI), 1).loss.backward()
    for net in (model.attention1, model.attention2):
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_a_few_steps_lower_the_loss(demo_slide):
    model = _model()
    view = SlideView(demo_slide, roi=ROI)
    opt = model.make_optimizer(lr=1e-2)

    def loss() -> torch.Tensor:
        torch.manual_seed(7)  # the same draws each time
        return model.training_step(view, 1).loss

    before = loss().item()
    for _ in range(3):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < before - 1e-3


# -- stage 1 in bands --------------------------------------------------------------------
def test_banded_stage1_matches_single_pass():
    with Slide(GOOD_SLIDES[2]) as slide:  # kidney-striped: 6 x 4 tiles
        view = SlideView(slide)
        whole = _model()
        banded = _model(stage1_band_pixels=1)  # one tile row per band
        grid = whole._grid(view)
        events = []
        with torch.no_grad():
            a = whole._stage1(view, grid)
            b = banded._stage1(view, grid, events.append)
        assert a.shape == (grid.rows, grid.cols) and grid.rows > 2
        assert torch.allclose(a, b, atol=5e-4)  # no halo: ~3e-3 off
        assert [e.done for e in events] == list(range(grid.rows + 1))


# -- the trace ---------------------------------------------------------------------------
def _close(r1, r2, tol=1e-6):
    return all(abs(u - v) <= tol for u, v in zip(r1, r2))


@pytest.mark.parametrize("path", GOOD_SLIDES, ids=lambda p: p.name)
def test_trace_geometry_and_streaming_order(path):
    model = _model()
    with Slide(path) as slide:
        view = SlideView(slide)
        probs, events = _run(model, view)
        W, H = slide.width, slide.height
    assert len(probs) == 2 and math.isclose(sum(probs), 1.0, rel_tol=1e-5)
    assert isinstance(events[0], Field) and events[0].id == 0 and events[0].kind == "view"
    assert _close(events[0].rect, (0, 0, W, H))
    assert isinstance(events[-1], Progress) and events[-1].done == events[-1].total
    assert any(isinstance(e, Progress) for e in events[:-1])

    fields: dict[int, Field] = {}
    tile_maps = 0
    for i, e in enumerate(events):
        if isinstance(e, Field):
            assert e.id not in fields
            x, y, w, h = e.rect
            assert w > 0 and h > 0
            assert x >= -1 and y >= -1 and x + w <= W + 1 and y + h <= H + 1
            if e.parent is not None:
                parent = fields[e.parent]  # parents stream before their children
                assert parent.contains(e) and e.depth == parent.depth + 1
                assert e.kind == {0: "tile", 1: "subtile"}[parent.depth]
            fields[e.id] = e
        elif isinstance(e, AttentionMap):
            rows, cols = e.shape
            assert rows > 0 and all(len(r) == cols for r in e.values)
            assert all(isinstance(v, float) for r in e.values for v in r)
            assert sum(map(sum, e.values)) == pytest.approx(1.0, rel=1e-4)
            if e.group == "stage 1":
                assert _close(e.rect, (0, 0, W, H), tol=1e-6)
            else:
                assert e.group == "stage 2"
                tile = fields[max(fields)]  # the map follows its tile's field
                assert tile.kind == "tile" and _close(e.rect, tile.rect, tol=1e-6)
                tile_maps += 1
        elif isinstance(e, TrailStep):
            assert fields[e.field_id].kind == "tile"
            assert math.isclose(sum(e.probs), 1.0, rel_tol=1e-5)
    tiles = [f for f in fields.values() if f.kind == "tile"]
    subs = [f for f in fields.values() if f.kind == "subtile"]
    assert tiles and tile_maps == len(tiles)
    assert len(subs) <= model.config.n_samples
    # Distinct draws inside one tile: its sub-tiles never repeat (unless the tile is no
    # larger than one sub-tile, which then is the whole tile).
    side = model.config.subtile_size
    for t in tiles:
        rects = [f.rect for f in subs if f.parent == t.id]
        assert rects
        if t.rect[2] > side and t.rect[3] > side:
            assert len(set(rects)) == len(rects)
        else:
            assert all(_close(r, t.rect) or r[2] == side or r[3] == side for r in rects)


def test_seeded_runs_repeat_and_cancellation_propagates(demo_slide):
    model = _model()
    view = SlideView(demo_slide, roi=(0, 0, 1400, 1100))
    p1, e1 = _run(model, view, seed=5)
    p2, e2 = _run(model, view, seed=5)
    assert p1 == p2 and e1 == e2

    class Stop(Exception):
        pass

    def emit(event):
        if isinstance(event, Field) and event.kind == "tile":
            raise Stop

    with pytest.raises(Stop):
        model.explain(view, emit)


# -- the reference's inference ------------------------------------------------------------
def test_reference_tile_weights_drop_the_lowest_thirty_percent():
    alpha = torch.arange(1.0, 11.0) / 55  # ten tiles, rising attention
    w = zi.reference_tile_weights(alpha)
    assert w.sum().item() == pytest.approx(1.0)
    # rescaled (alpha - min) / max = 0, 0.1, ... 0.9; its 30 % quantile ("lower") is 0.2
    assert w[0] == 0 and w[1] == 0
    assert torch.all(w[2:] > 0) and w[9] / w[2] == pytest.approx(0.9 / 0.2)
    flat = zi.reference_tile_weights(torch.full((4,), 0.25))
    assert torch.allclose(flat, torch.full((4,), 0.25))


def test_reference_draws_take_high_attention_tiles_and_their_top_subtiles(demo_slide):
    model = _model(draws="reference", n_samples=12)
    view = SlideView(demo_slide, roi=ROI)
    _probs, events = _run(model, view)
    alpha = next(e for e in events if isinstance(e, AttentionMap) and e.group == "stage 1")
    values = torch.tensor(alpha.values).reshape(-1)
    keep = zi.reference_tile_weights(values) > 0
    tiles = [e for e in events if isinstance(e, Field) and e.kind == "tile"]
    assert tiles and all(any(abs(e.score - float(v)) < 1e-6 for v in values[keep]) for e in tiles)
    maps = {e.name: torch.tensor(e.values).reshape(-1) for e in events
            if isinstance(e, AttentionMap) and e.group == "stage 2"}
    for tile in tiles:
        beta = maps[f"stage 2 attention, tile {tile.id}"]
        subs = [e for e in events if isinstance(e, Field) and e.kind == "subtile" and e.parent == tile.id]
        got = sorted((e.score / tile.score for e in subs), reverse=True)
        best = torch.topk(beta, len(subs)).values.tolist()
        assert got == pytest.approx(best, rel=1e-5)
    with pytest.raises(ValueError, match="draws"):
        _model(draws="greedy")
