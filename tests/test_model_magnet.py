"""MagNet and its sampler: linearised multi-sampling, spatial sparsemax, zooms, training, traces."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from engines import registry
from engines.lms import lms_grid_sample
from engines.models.magnet import MagNetConfig, box_mass, mask_to_zoom, sparsemax
from engines.sampling import Orientation, SlideView, crop, zoom_theta
from engines.slide import Slide
from engines.trace import AttentionMap, Field, Progress, TrailStep
from tests.conftest import DATA, DEMO_SLIDE, GOOD_SLIDES

TISSUE_ROI = (700.0, 1100.0, 512.0, 512.0)  # a tissue-rich square of the demo slide


def _bilinear(image, grid):
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grid_grads(image, grid, weights, sampler):
    g = grid.clone().requires_grad_(True)
    (sampler(image, g) * weights).sum().backward()
    return g.grad


def _smooth_image(h: int = 64, w: int = 64) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([torch.sin(xx / 7) + torch.cos(yy / 9), torch.sin((xx + yy) / 11), torch.cos(xx / 5 - yy / 13)])[None]


# ---------------------------------------------------------------------------------------
# Linearised multi-sampling
# ---------------------------------------------------------------------------------------
def test_lms_forward_equals_bilinear():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 20, 30)
    grid = torch.rand(2, 7, 9, 2) * 2.4 - 1.2  # some samples fall outside: border padding
    assert torch.allclose(lms_grid_sample(image, grid), _bilinear(image, grid), atol=1e-6)


def test_lms_image_gradient_is_bilinear():
    torch.manual_seed(1)
    image = torch.rand(1, 3, 16, 16)
    grid = torch.rand(1, 8, 8, 2) * 2 - 1
    w = torch.randn(1, 3, 8, 8)
    grads = []
    for fn in (_bilinear, lms_grid_sample):
        img = image.clone().requires_grad_(True)
        (fn(img, grid) * w).sum().backward()
        grads.append(img.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_lms_grid_gradient_matches_bilinear_on_smooth_image():
    torch.manual_seed(2)
    image = _smooth_image()
    theta = zoom_theta(torch.tensor([0.5]), torch.tensor([0.1]), torch.tensor([-0.2]))
    grid = F.affine_grid(theta, [1, 3, 32, 32], align_corners=False)
    w = torch.randn(1, 3, 32, 32)
    ref = _grid_grads(image, grid, w, _bilinear)
    got = _grid_grads(image, grid, w, lms_grid_sample)
    cos = F.cosine_similarity(ref.flatten(), got.flatten(), dim=0)
    assert cos > 0.95
    assert 0.7 < got.norm() / ref.norm() < 1.3


def test_lms_gradient_does_not_vanish_when_zoomed_in():
    # A step edge one pixel beyond a strongly magnified flat window: bilinear sees only the
    # four pixels around each sample (all zero), the jittered fit reaches the edge.
    image = torch.zeros(1, 1, 32, 32)
    image[..., 17:] = 1.0
    xs = torch.linspace(15.2, 15.8, 8)
    ys = torch.linspace(10.0, 20.0, 8)
    gx, gy = (2 * xs + 1) / 32 - 1, (2 * ys + 1) / 32 - 1
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    grid = torch.stack([xx, yy], -1)[None]
    w = torch.ones(1, 1, 8, 8)
    ref = _grid_grads(image, grid, w, _bilinear)
    torch.manual_seed(3)
    got = _grid_grads(image, grid, w, lms_grid_sample)
    assert ref.abs().max() < 1e-6
    # Moving right brightens: positive x-gradient at most samples, finite everywhere.
    assert torch.isfinite(got).all()
    assert (got[..., 0] > 0).float().mean() > 0.5
    assert got[..., 0].mean() > 0.5


def test_lms_gradients_reach_theta_through_crop():
    torch.manual_seed(4)
    image = _smooth_image(48, 48)
    params = torch.tensor([0.3, 0.2, -0.1], requires_grad=True)
    out = crop(image, zoom_theta(params[:1], params[1:2], params[2:3]), 16, 16, method="lms")
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(params.grad).all() and params.grad.abs().min() > 0


def test_lms_rejects_bad_shapes():
    with pytest.raises(ValueError, match="grid"):
        lms_grid_sample(torch.rand(1, 3, 8, 8), torch.rand(1, 4, 4, 3))
    with pytest.raises(ValueError, match="batch"):
        lms_grid_sample(torch.rand(2, 3, 8, 8), torch.rand(1, 4, 4, 2))


def test_lms_seeded_gradients_repeat():
    image = _smooth_image(24, 24)
    grid = torch.rand(1, 6, 6, 2) * 2 - 1
    w = torch.randn(1, 3, 6, 6)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(_grid_grads(image, grid, w, lms_grid_sample))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # the jitter really is drawn from torch's RNG


# ---------------------------------------------------------------------------------------
# Spatial sparsemax and the zoom it implies
# ---------------------------------------------------------------------------------------
def _simplex_projection_brute_force(z: list[float]) -> list[float]:
    """Try every support set; keep the feasible KKT point closest to z."""
    n, best, best_d = len(z), None, math.inf
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            tau = (sum(z[i] for i in support) - 1) / size
            p = [z[i] - tau if i in support else 0.0 for i in range(n)]
            if any(p[i] <= 0 for i in support) or any(z[i] > tau + 1e-12 for i in range(n) if i not in support):
                continue
            d = sum((a - b) ** 2 for a, b in zip(p, z))
            if d < best_d:
                best, best_d = p, d
    return best


def test_sparsemax_matches_brute_force_projection():
    gen = torch.Generator().manual_seed(7)
    for scale in (0.1, 1.0, 3.0):
        z = torch.randn(6, 5, generator=gen) * scale
        got = sparsemax(z)
        for row, out in zip(z.tolist(), got):
            assert torch.allclose(out, torch.tensor(_simplex_projection_brute_force(row)), atol=1e-6)


def test_sparsemax_sums_to_one_and_is_sparse():
    z = torch.tensor([[3.0, 1.0, 0.2, -1.0], [0.5, 0.5, 0.5, 0.5]])
    p = sparsemax(z)
    assert torch.allclose(p.sum(1), torch.ones(2))
    assert torch.allclose(p[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # one clear winner
    assert torch.allclose(p[1], torch.full((4,), 0.25))  # ties share
    big = sparsemax(torch.randn(3, 56 * 56) * 5)
    assert (big == 0).float().mean() > 0.5 and (big >= 0).all()
    # dim argument: same result on the transposed tensor
    assert torch.allclose(sparsemax(z.t(), dim=0), p.t())


def test_sparsemax_gradient_matches_its_jacobian():
    z = torch.tensor([1.0, 0.8, 0.1, -2.0], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.3, -1.0, 2.0, 5.0], dtype=torch.float64)
    (sparsemax(z) * g).sum().backward()
    support = sparsemax(z.detach()) > 0
    expected = torch.where(support, g - g[support].mean(), torch.zeros_like(g))
    assert torch.allclose(z.grad, expected)


def test_mask_to_zoom_reads_centre_and_spread():
    n = 56
    uniform = torch.full((1, n, n), 1.0 / (n * n))
    s, tx, ty = mask_to_zoom(uniform)
    assert abs(float(s) - math.sqrt(1 / 3)) < 0.01 and abs(float(tx)) < 1e-5 and abs(float(ty)) < 1e-5
    point = torch.zeros(1, n, n)
    point[0, 10, 40] = 1.0
    s, tx, ty = mask_to_zoom(point, min_scale=0.05)
    assert float(s) == pytest.approx(0.05)
    assert float(tx) > 0.3 and float(ty) < -0.4  # right of centre, above it
    assert box_mass(point[0], float(s), float(tx), float(ty)) == pytest.approx(1.0)
    # Random masks: every box inside its parent, scale within bounds.
    masks = sparsemax(torch.randn(50, n * n) * 0.05).view(50, n, n)
    corner = torch.zeros(1, n, n)
    corner[0, 0, 0] = corner[0, -1, -1] = 0.5  # spread beyond what fits
    s, tx, ty = mask_to_zoom(torch.cat([masks, corner]))
    assert (s >= 0.05).all() and (s <= 1).all()
    assert (tx.abs() + s <= 1 + 1e-6).all() and (ty.abs() + s <= 1 + 1e-6).all()


# ---------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------
def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_presets_build_and_differ_in_size():
    torch.manual_seed(0)
    tiny = registry.create("magnet", "tiny")
    paper = registry.create("magnet", "paper")
    assert tiny.name == paper.name == "magnet"
    assert paper.config.layers == 3 and paper.config.total_patches == 18
    assert paper.config.input_px == 56 and paper.config.source_px == 112 and paper.config.final_px == 224
    # Inception-v3 (~22M) plus two ResNet-18s (~11M each) dwarf the tiny model.
    assert _count(paper) > 40_000_000 > 1_000_000 > _count(tiny)
    backbone_ids = {id(p) for p in paper.backbone_parameters()}
    assert {id(p) for p in paper.backbone.parameters()} <= backbone_ids
    assert not any(id(p) in backbone_ids for p in paper.localisers.parameters())


def test_bad_configs_are_refused_clearly():
    with pytest.raises(ValueError, match="one positive count per layer"):
        registry.create("magnet", "tiny", layers=4)
    with pytest.raises(ValueError, match="sampler"):
        MagNetConfig(sampler="nearest")
    model = registry.create("magnet", "tiny")
    view = SlideView(Slide(DATA / "small.svs"))
    with pytest.raises(ValueError, match="label"):
        model.training_step(view, 5)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_roi_view():
    return SlideView(Slide(DEMO_SLIDE), roi=TISSUE_ROI)


@pytest.mark.parametrize("sampler", ["lms", "bilinear"])
def test_training_step_shapes_and_gradients_reach_localisers(demo_roi_view, sampler):
    torch.manual_seed(0)
    model = registry.create("magnet", "tiny", classes=["a", "b", "c"], sampler=sampler)
    model.train()
    out = model.training_step(demo_roi_view, 2)
    assert out.logits.shape == (3,)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert {"ce", "ce_aux1", "ce_aux3", "paradox", "loss"} <= set(out.parts)
    assert out.parts["paradox"] == pytest.approx(max(0.0, out.parts["ce_aux3"] - out.parts["ce_aux1"]), abs=1e-5)
    out.loss.backward()
    # Every layer's localiser (the convolutions under the sparsemax) learns through the sampler.
    assert set(model.localisers.keys()) == {"0", "1", "2"}
    for key, loc in model.localisers.items():
        g = loc.score.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, key
        g = loc.layer1[1].weight.grad
        assert g is not None and g.abs().sum() > 0, key
    for aux in model.aux.values():
        assert aux.head.weight.grad.abs().sum() > 0
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused  # DDP-safe: every parameter takes part in the loss


def test_optimisation_lowers_the_loss(demo_roi_view):
    torch.manual_seed(0)
    model = registry.create("magnet", "tiny")
    model.train()
    opt = model.make_optimizer(1e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        out = model.training_step(demo_roi_view, 1)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    final = model.training_step(demo_roi_view, 1).parts["loss"]
    assert final < losses[0] - 0.05, (losses, final)


def test_seeded_training_repeats(demo_roi_view):
    grads = []
    for _ in range(2):
        torch.manual_seed(3)
        model = registry.create("magnet", "tiny")
        model.train()
        out = model.training_step(demo_roi_view, 0)
        out.loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.localisers.parameters()]))
    assert torch.equal(grads[0], grads[1])


def test_training_on_an_augmented_view():
    # Flipped and turned views (the trainer's augmentation) and the grey filter of Sec. 4.2.
    torch.manual_seed(0)
    model = registry.create("magnet", "tiny")
    model.train()
    view = SlideView(Slide(DEMO_SLIDE), roi=(700.0, 1100.0, 600.0, 300.0),
                     orientation=Orientation(flip=True, rot90=1), grey_filter=True)
    out = model.training_step(view, 1)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits.shape == (2,)
    assert model.localisers["0"].score.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# Inference traces
# ---------------------------------------------------------------------------------------
def _explain(model, view):
    events: list = []
    model.eval()
    probs = model.explain(view, events.append)
    return probs, events


def _check_trace(model, view, probs, events):
    cfg = model.config
    sw, sh = view.slide.width, view.slide.height
    first = events[0]
    assert isinstance(first, Field) and first.id == 0 and first.parent is None and first.depth == 0
    assert first.kind == "view" and first.rect == tuple(map(float, view.bounds))
    fields: dict[int, Field] = {}
    for e in events:
        if isinstance(e, Field):
            assert e.id not in fields
            if e.parent is not None:
                parent = fields[e.parent]  # parents arrive before their children
                assert e.depth == parent.depth + 1 and e.kind == "zoom"
                assert parent.contains(e, tol=1.0)
                assert 0.0 <= e.score <= 1.0 + 1e-6
            x, y, w, h = e.rect
            assert w > 0 and h > 0
            assert x >= -1 and y >= -1 and x + w <= sw + 1 and y + h <= sh + 1
            fields[e.id] = e
        elif isinstance(e, AttentionMap):
            rows, cols = e.shape
            side = cfg.input_px
            assert (rows, cols) == (side, side)
            # The map lies exactly on a field it scored (the parent of the boxes it produced).
            assert any(
                all(abs(a - b) < 1e-6 for a, b in zip(e.rect, f.rect)) for f in fields.values()
            )
            assert abs(sum(map(sum, e.values)) - 1.0) < 1e-3 and min(map(min, e.values)) >= 0
            x, y, w, h = e.rect
            assert x >= -1 and y >= -1 and x + w <= sw + 1 and y + h <= sh + 1
        elif isinstance(e, TrailStep):
            f = fields[e.field_id]  # the final patch exists before its trail step
            assert f.depth == cfg.layers
            assert abs(sum(e.probs) - 1.0) < 1e-5
    by_depth = [sum(1 for f in fields.values() if f.depth == d) for d in range(cfg.layers + 1)]
    assert by_depth == [1] + [math.prod(cfg.patches[: d + 1]) for d in range(cfg.layers)]
    trail = [e for e in events if isinstance(e, TrailStep)]
    assert [t.index for t in trail] == list(range(cfg.total_patches))
    assert trail[-1].probs == pytest.approx(probs)
    progress = [i for i, e in enumerate(events) if isinstance(e, Progress)]
    assert progress and progress[0] < len(events) // 2  # progress streams, not only at the end
    last = events[progress[-1]]
    assert last.done == last.total
    # Frozen patch: the first child of every layer-2 field is its whole parent.
    for f in fields.values():
        if f.depth == 2 and cfg.frozen_layer == 2:
            siblings = sorted(g.id for g in fields.values() if g.parent == f.parent)
            if f.id == siblings[0]:
                assert f.rect == pytest.approx(fields[f.parent].rect)
                assert f.score == 1.0
    assert len(probs) == model.num_classes and abs(sum(probs) - 1) < 1e-5


@pytest.mark.parametrize("path", GOOD_SLIDES, ids=lambda p: p.name)
def test_trace_geometry_on_real_slides(path):
    torch.manual_seed(0)
    model = registry.create("magnet", "tiny")
    view = SlideView(Slide(path))
    probs, events = _explain(model, view)
    _check_trace(model, view, probs, events)


def test_paper_tree_with_three_patches_and_frozen_patch():
    # The paper's 2-3-3 tree (18 final patches) with small feature nets to stay fast.
    torch.manual_seed(0)
    model = registry.create("magnet", "paper", backbone="small", aux_backbone="small",
                            final_px=64, final_source_px=128, branch_width=2, gru_hidden=16)
    view = SlideView(Slide(DATA / "boxes-levels.tiff"))
    probs, events = _explain(model, view)
    _check_trace(model, view, probs, events)
    # Layer 2 has 2 fields x (3 - 1 frozen) learned stacks.
    assert model.localisers["1"].groups == 4


def test_explain_is_deterministic_and_on_a_roi(demo_roi_view):
    torch.manual_seed(0)
    model = registry.create("magnet", "tiny")
    a = _explain(model, demo_roi_view)
    b = _explain(model, demo_roi_view)
    assert a[0] == b[0]
    assert [e for e in a[1] if not isinstance(e, Progress)] == [e for e in b[1] if not isinstance(e, Progress)]
    fields = [e for e in a[1] if isinstance(e, Field)]
    x0, y0, w0, h0 = TISSUE_ROI
    for f in fields:  # every box within the ROI, in level-0 slide pixels
        x, y, w, h = f.rect
        assert x >= x0 - 1 and y >= y0 - 1 and x + w <= x0 + w0 + 1 and y + h <= y0 + h0 + 1


def test_cancellation_propagates(demo_roi_view):
    class Cancelled(Exception):
        pass

    seen = []

    def emit(e):
        seen.append(e)
        if isinstance(e, TrailStep):
            raise Cancelled()

    model = registry.create("magnet", "tiny")
    model.eval()
    with pytest.raises(Cancelled):
        model.explain(demo_roi_view, emit)
    assert sum(isinstance(e, TrailStep) for e in seen) == 1


def test_paper_grey_filter_is_on_and_whitens_grey_before_the_model_sees_it(tmp_path):
    """Sec. 4.2: grey pixels read as background. The paper preset turns it on; a tiny MagNet
    with it on answers differently on a slide with grey glass, and nearly the same on one without."""
    import numpy as np
    from PIL import Image

    from engines.models.magnet import PRESETS

    assert PRESETS["paper"].grey_filter and not PRESETS["tiny"].grey_filter
    rng = np.random.default_rng(0)
    tissue = np.stack([rng.integers(190, 230, (96, 96)), rng.integers(60, 120, (96, 96)),
                       rng.integers(130, 170, (96, 96))], -1).astype(np.uint8)  # pink: never grey
    for name, glass in (("grey.png", 150), ("white.png", 255)):
        img = np.full((384, 384, 3), glass, np.uint8)
        img[140:236, 140:236] = tissue
        Image.fromarray(img).save(tmp_path / name)
    torch.manual_seed(0)
    plain = registry.create("magnet", "tiny").eval()
    filtered = registry.create("magnet", "tiny", grey_filter=True).eval()
    filtered.load_state_dict(plain.state_dict())
    answers = {}
    for name in ("grey.png", "white.png"):
        with Slide(tmp_path / name) as slide:
            answers[name] = [m.explain(SlideView(slide), lambda e: None) for m in (plain, filtered)]
    grey = abs(answers["grey.png"][0][1] - answers["grey.png"][1][1])
    white = abs(answers["white.png"][0][1] - answers["white.png"][1][1])
    # Without grey glass only the few resampled pixels where tissue fades into glass change.
    assert grey > 20 * white and grey > 1e-3
