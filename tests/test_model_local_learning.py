"""Locally supervised learning model: structure, local losses, strip inference, traces."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from engines import registry
from engines.models import backbones
from engines.models.local_learning import ChannelNorm, LocalLearning, module_groups
from engines.sampling import Orientation, SlideView
from engines.slide import Slide
from engines.trace import AttentionMap, Field, Progress, TrailStep
from tests.conftest import DATA, DEMO_SLIDE, GOOD_SLIDES

SMALL = DATA / "small.svs"


def tiny(**overrides) -> LocalLearning:
    torch.manual_seed(0)
    return registry.create("local_learning", "tiny", **overrides)


def _input(x: torch.Tensor) -> torch.Tensor:
    """An image in [0, 1] as the model reads it (sides here are multiples of the stride)."""
    return backbones.normalise(x)


def grads_of(params) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def randomise_bn(model: nn.Module) -> None:
    """Give BatchNorm non-trivial running statistics so eval-mode BN is not an identity."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


# -- building ---------------------------------------------------------------------------------
def test_presets_build_with_paper_sizes():
    small = tiny()
    assert small.num_modules == 4 and small.stride == 48
    paper = registry.create("local_learning", "paper")
    ref = torchvision.models.resnet34()
    ref_trunk = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in paper.backbone_parameters()) == ref_trunk
    assert paper.trunk.stem[0].stride == (3, 3) and paper.stride == 48
    assert paper.out_stride == [6, 12, 24, 48]
    assert all(not p.requires_grad for p in paper.trunk.stem.parameters())
    bn = [m for m in paper.trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not p.requires_grad for m in bn for p in m.parameters())
    paper.train()
    assert all(not m.training for m in bn) and paper.head.training
    assert paper.margin >= paper.trunk.receptive_radius() and paper.margin % 48 == 0
    assert paper.config.accumulation == 8
    total = sum(p.numel() for p in paper.parameters())
    assert total > ref_trunk  # heads and RFR units come on top
    opt = paper.make_optimizer(2e-5)
    assert isinstance(opt, torch.optim.AdamW)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([1e-5, 2e-5])
    assert all(g["weight_decay"] == pytest.approx(1e-6) for g in opt.param_groups)


def test_module_grouping():
    k8 = module_groups((3, 4, 6, 3), 8)
    assert [len(g) for g in k8] == [1, 1, 1, 2, 2, 3, 3, 3]
    assert k8[3] == [(1, 0), (1, 1)] and k8[7] == [(3, 0), (3, 1), (3, 2)]
    k4 = module_groups((3, 4, 6, 3), 4)  # the reference's: two K = 8 units per module
    assert k4 == [k8[0] + k8[1], k8[2] + k8[3], k8[4] + k8[5], k8[6] + k8[7]]
    assert module_groups((3, 4, 6, 3), 2) == [k8[0] + k8[1] + k8[2] + k8[3], k8[4] + k8[5] + k8[6] + k8[7]]
    for k in (1, 2, 3, 5, 16):
        groups = module_groups((3, 4, 6, 3), k)
        flat = [b for g in groups for b in g]
        assert len(groups) == k and len(flat) == 16 and flat == sorted(flat)
    with pytest.raises(ValueError, match="num_modules"):
        module_groups((2, 2, 2, 2), 9)
    with pytest.raises(ValueError, match="num_modules"):
        tiny(num_modules=0)
    with pytest.raises(ValueError, match="backbone"):
        tiny(backbone="vgg")


# -- training ---------------------------------------------------------------------------------
def test_training_step_shapes_and_parts():
    model = tiny(classes=None)
    model = LocalLearning(model.config, classes=["a", "b", "c"])
    model.train()
    out = model.training_step(SlideView(Slide(SMALL)), 2)
    assert out.logits.shape == (3,) and out.loss.dim() == 0
    assert set(out.parts) == {"m1_ce", "m1_rfr", "m2_ce", "m2_rfr", "m3_ce", "m3_rfr", "head_ce", "loss"}
    local = sum(v for k, v in out.parts.items() if k != "loss")
    assert float(out.loss.detach()) == pytest.approx(local, rel=1e-5)
    with pytest.raises(ValueError, match="label"):
        model.training_step(SlideView(Slide(SMALL)), 3)
    # A quarter-turned training view swaps the input sides.
    roi = (100.0, 200.0, 480.0, 960.0)
    upright = SlideView(Slide(DEMO_SLIDE), roi=roi)
    turned = SlideView(Slide(DEMO_SLIDE), roi=roi, orientation=Orientation(flip=True, rot90=1))
    (w, h), (tw, th) = model.input_size(upright), model.input_size(turned)
    assert (tw, th) == (h, w) and h > w and w % 48 == 0 and h % 48 == 0
    assert model.training_step(turned, 0).logits.shape == (3,)


def test_training_step_gradients_match_module_by_module_backward():
    """The loss returned to the trainer carries exactly the local gradients, scaled by
    whatever factor the trainer multiplies it with."""
    model = tiny().train()
    view = SlideView(Slide(SMALL))
    w, h = model.input_size(view)
    x = model._reader(view, w, h)(0, h)
    params = [p for p in model.parameters() if p.requires_grad]

    torch.manual_seed(5)
    out = model.training_step(view, 1)
    (out.loss * 0.25).backward()
    via_trainer = grads_of(params)

    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    for ml in model.local_losses(x, 1):
        (ml.loss * 0.25).backward()
    direct = grads_of(params)
    assert sum(float(g.abs().sum()) for g in direct) > 0
    for a, b in zip(via_trainer, direct):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_no_gradient_crosses_a_module_boundary():
    model = tiny().train()
    x = _input(torch.rand(1, 3, 96, 144, generator=torch.Generator().manual_seed(0)))
    first = [p for p in model.module_parameters(0) if p.requires_grad]
    for ml in model.local_losses(x, 1):
        if ml.index > 0:
            grads = torch.autograd.grad(ml.loss, first, allow_unused=True, retain_graph=True)
            assert all(g is None for g in grads), f"module {ml.index + 1} reaches module 1"
            own = torch.autograd.grad(ml.loss, model.trunk.stages[ml.index][0].conv1.weight)[0]
            assert own.abs().sum() > 0
    # In a full step, module 1's gradient is its local loss's gradient alone.
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    model.local_step(_input(torch.rand(1, 3, 96, 144, generator=torch.Generator().manual_seed(0))), 1).loss.backward()
    full = grads_of(first)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    first_loss = next(iter(model.local_losses(x, 1)))
    first_loss.loss.backward()
    alone = grads_of(first)
    for a, b in zip(full, alone):
        torch.testing.assert_close(a, b)
    # End to end (K = 1) the head loss does reach the first block.
    e2e = tiny(num_modules=1).train()
    ml = next(iter(e2e.local_losses(x, 1)))
    g = torch.autograd.grad(ml.loss, [p for p in e2e.trunk.stages[0][0].parameters() if p.requires_grad])
    assert all(t is not None for t in g) and sum(float(t.abs().sum()) for t in g) > 0


def test_gradients_reach_attention_heads_and_every_module():
    model = tiny().train()
    torch.manual_seed(0)
    model.local_step(_input(torch.rand(1, 3, 96, 96)), 1).loss.backward()
    heads = list(model.aux) + [model.head]
    for h in heads:
        for lin in (h.attn_w, h.attn_v, h.attn_u, h.proj):
            assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    for r in model.rfr:
        assert r.net[0].weight.grad is not None and r.net[0].weight.grad.abs().sum() > 0
    for s, b in (g[0] for g in model.groups):
        conv = model.trunk.stages[s][b].conv1
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_optimisation_steps_lower_the_loss():
    model = tiny().train()
    view = SlideView(Slide(DEMO_SLIDE), roi=(600, 900, 400, 400))
    opt = model.make_optimizer(3e-3)

    def loss_now() -> float:
        torch.manual_seed(11)  # the same RFR crops every time
        with torch.no_grad():
            return float(model.training_step(view, 1).loss)

    before = loss_now()
    for _ in range(4):
        opt.zero_grad()
        torch.manual_seed(11)
        model.training_step(view, 1).loss.backward()
        opt.step()
    assert loss_now() < before


def test_seeded_training_is_deterministic():
    def run() -> tuple[float, list[torch.Tensor]]:
        model = tiny().train()
        torch.manual_seed(7)
        out = model.training_step(SlideView(Slide(SMALL)), 0)
        out.loss.backward()
        return float(out.loss.detach()), grads_of(model.parameters())

    (l1, g1), (l2, g2) = run(), run()
    assert l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


# -- strip inference -------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,height", [
    ({}, 48 * 16),
    # The ResNet-34 layout (deeper, wider receptive field) with narrow widths.
    ({"widths": (4, 4, 8, 8), "blocks": (3, 4, 6, 3), "head_dim": 8, "gn_groups": 4}, 48 * 31),
    # A per-pixel norm in the trunk keeps strips exact (a norm over the map would not).
    ({"trunk_norm": "channel"}, 48 * 16),
    # A final head whose cells are 2 x 2 grid cells (the paper preset's are 5 x 5).
    ({"head_kernel": 2}, 48 * 16),
])
def test_strip_inference_equals_whole_image(overrides, height):
    model = tiny(strip_rows=2, **overrides).eval()
    randomise_bn(model)
    x = _input(torch.rand(1, 3, height, 96, generator=torch.Generator().manual_seed(2)))
    assert 2 * model.margin < height  # some strips have both margins inside the image
    steps = []
    with torch.no_grad():
        whole = model.project_whole(x)
        strips = model.project_strips(lambda r0, r1: x[:, :, r0:r1], height,
                                      lambda j, n, i, a: steps.append((j, n, i)))
    assert len({j for j, _, _ in steps}) == math.ceil(height / 48 / 2) > 2
    for i, (a, b) in enumerate(zip(whole, strips)):
        k = model.config.head_kernel if i == model.num_modules - 1 else 1
        assert a.shape == b.shape == (1, model.config.head_dim, height // 48 // k, 2 // k)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Too small a margin must show (the test can fail).
    model.margin = 0
    with torch.no_grad():
        cut = model.project_strips(lambda r0, r1: x[:, :, r0:r1], height)
    assert not torch.allclose(cut[-1], whole[-1], atol=1e-5)


def test_channel_norm_trunk_normalises_every_pixel_and_trains():
    model = tiny(trunk_norm="channel")
    norms = [m for m in model.trunk.modules() if isinstance(m, ChannelNorm)]
    assert norms and not any(isinstance(m, nn.BatchNorm2d) for m in model.trunk.modules())
    x = torch.randn(1, 16, 5, 7) * 30 + 4
    out = ChannelNorm(16)(x)  # identity affine at init: zero mean, unit variance per pixel
    torch.testing.assert_close(out.mean(1), torch.zeros(1, 5, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(1, unbiased=False), torch.ones(1, 5, 7), atol=1e-3, rtol=0)
    # Its norms learn (freeze_bn only freezes BatchNorm).
    out = model.local_step(_input(torch.rand(1, 3, 96, 96)), 1)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert norms[0].weight.grad is not None and norms[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="trunk_norm"):
        tiny(trunk_norm="instance")


# -- traces ----------------------------------------------------------------------------------
def run_explain(model, view):
    events = []
    with torch.no_grad():
        probs = model.explain(view, events.append)
    return probs, events


@pytest.mark.parametrize("path", GOOD_SLIDES, ids=lambda p: p.name)
def test_trace_geometry_on_real_slides(path):
    model = tiny().eval()
    slide = Slide(path)
    view = SlideView(slide)
    probs, events = run_explain(model, view)
    assert len(probs) == 2 and sum(probs) == pytest.approx(1.0, abs=1e-5)
    check_trace(model, view, events)


def test_trace_of_a_region_of_interest_lies_on_it():
    model = tiny().eval()
    roi = (300.0, 450.0, 1200.0, 1800.0)
    view = SlideView(Slide(DEMO_SLIDE), roi=roi)
    _, events = run_explain(model, view)
    check_trace(model, view, events)
    for m in (e for e in events if isinstance(e, AttentionMap)):
        assert m.rect == pytest.approx(roi, abs=1e-6)


def check_trace(model, view, events):
    bx, by, bw, bh = view.bounds
    sw, sh = view.slide.width, view.slide.height
    assert isinstance(events[0], Field) and events[0].id == 0 and events[0].rect == view.bounds
    fields = {e.id: e for e in events if isinstance(e, Field)}
    assert len(fields) == sum(isinstance(e, Field) for e in events)  # unique ids
    for f in fields.values():
        x, y, w, h = f.rect
        assert x >= -1 and y >= -1 and x + w <= sw + 1 and y + h <= sh + 1 and w > 0 and h > 0
        if f.parent is not None:
            assert fields[f.parent].contains(f) and f.depth == fields[f.parent].depth + 1
    strips = [f for f in fields.values() if f.kind == "strip"]
    assert strips and sum(f.rect[3] for f in strips) == pytest.approx(bh, abs=1e-6)
    maps = [e for e in events if isinstance(e, AttentionMap)]
    assert [m.name for m in maps] == [f"module {i}" for i in range(1, model.num_modules)] + ["head"]
    assert [m.group for m in maps] == ["module"] * (model.num_modules - 1) + ["head"]
    w_in, h_in = model.input_size(view)
    for m in maps:
        c = 48 * (model.config.head_kernel if m.name == "head" else 1)  # input pixels per cell
        assert w_in % c == 0 and h_in % c == 0
        assert m.shape == (h_in // c, w_in // c)
        assert m.origin == (bx, by)
        assert m.cell == pytest.approx((c * bw / w_in, c * bh / h_in))
        assert m.rect == pytest.approx(view.bounds, abs=1e-6)
        assert sum(map(sum, m.values)) == pytest.approx(1.0, abs=1e-4)
        assert all(isinstance(v, float) and v >= 0 for row in m.values for v in row)
    trail = [e for e in events if isinstance(e, TrailStep)]
    assert [t.index for t in trail] == list(range(model.num_modules))
    progress = [i for i, e in enumerate(events) if isinstance(e, Progress)]
    first_map = events.index(maps[0])
    assert progress and progress[0] < first_map  # progress streams before the maps
    dones = [events[i].done for i in progress]
    assert dones == sorted(dones) and events[progress[-1]].done == events[progress[-1]].total
    assert progress[-1] == len(events) - 1


def test_explain_is_deterministic_and_emit_can_cancel():
    view = SlideView(Slide(SMALL))
    p1, e1 = run_explain(tiny().eval(), view)
    p2, e2 = run_explain(tiny().eval(), view)
    assert p1 == p2 and e1 == e2

    class Stop(Exception):
        pass

    def emit(event):
        if isinstance(event, Progress):
            raise Stop

    with pytest.raises(Stop):
        tiny().eval().explain(view, emit)


def test_paper_preset_eight_modules_train_on_a_small_input():
    torch.manual_seed(0)
    model = registry.create("local_learning", "paper", num_modules=8).train()
    assert model.out_stride == [6, 6, 6, 12, 12, 24, 24, 48]
    assert [r.factor for r in model.rfr] == [6, 1, 1, 2, 1, 2, 1]
    # The reference's final head: kernel = stride = 5 cells, 512-d, so the input is 240 px cells.
    assert model.head.proj.kernel_size == (5, 5) and model.head.proj.out_channels == 512
    assert model.unit == 240
    out = model.local_step(_input(torch.rand(1, 3, 240, 240)), 1)
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach())) and out.logits.shape == (2,)
    assert {f"m{i}_rfr" for i in range(1, 8)} <= set(out.parts)
    assert all(p.grad is None for p in model.trunk.stem.parameters())  # frozen stem
    assert model.trunk.stages[3][2].conv2.weight.grad.abs().sum() > 0
    assert model.trunk.stages[0][1].conv1.weight.grad.abs().sum() > 0


def test_head_cells_of_several_grid_cells_tile_the_view():
    view = SlideView(Slide(DEMO_SLIDE))
    model = tiny(strip_rows=4, head_kernel=2).eval()
    w_in, h_in = model.input_size(view)
    assert w_in % 96 == 0 and h_in % 96 == 0
    _, events = run_explain(model, view)
    check_trace(model, view, events)
    head = [e for e in events if isinstance(e, AttentionMap) and e.name == "head"][0]
    assert head.shape == (h_in // 96, w_in // 96)
    with pytest.raises(ValueError, match="head_kernel"):
        tiny(head_kernel=3)  # 16 strip rows are not whole head cells


def test_many_strips_on_a_slide_agree_with_one_strip():
    view = SlideView(Slide(DEMO_SLIDE))
    one, e_one = run_explain(tiny(strip_rows=64).eval(), view)
    model = tiny(strip_rows=2).eval()
    many, e_many = run_explain(model, view)
    check_trace(model, view, e_many)
    assert sum(isinstance(e, Field) and e.kind == "strip" for e in e_many) > 2
    assert sum(isinstance(e, Field) and e.kind == "strip" for e in e_one) == 1
    # Rows are read band by band, so pixels may differ by resampling at band edges only.
    assert many == pytest.approx(one, abs=1e-4)
    maps_one = [e for e in e_one if isinstance(e, AttentionMap)]
    maps_many = [e for e in e_many if isinstance(e, AttentionMap)]
    for a, b in zip(maps_one, maps_many):
        torch.testing.assert_close(torch.tensor(a.values), torch.tensor(b.values), rtol=0, atol=1e-4)

