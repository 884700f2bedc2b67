"""YoloLoss (OTA, AuxOTA, anchor-free), HeadInfo and the hyper-parameter files."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from search_spaces.errors import ConfigError, DataError
from trainer.hyp import Hyp, load_hyp
from trainer.loss import HeadInfo, YoloLoss, bce, objectness_balance

STRIDES = (8.0, 16.0, 32.0)
# yolov7-tiny anchors in pixels -> grid units
ANCHORS = torch.tensor([[[10, 13], [16, 30], [33, 23]], [[30, 61], [62, 45], [59, 119]],
                        [[116, 90], [156, 198], [373, 326]]], dtype=torch.float32) / torch.tensor(
    STRIDES)[:, None, None]
IMG = 128


def head(nc: int = 3, **kw) -> HeadInfo:
    """Anchor-based 3-level head (or anchor-free with anchor_free=True)."""
    if kw.get("anchor_free"):
        return HeadInfo(nc, 3, 1, STRIDES, torch.zeros(3, 1, 2), **kw)
    return HeadInfo(nc, 3, 3, STRIDES, ANCHORS, **kw)


def preds(nc: int = 3, na: int = 3, batch: int = 2, seed: int = 0, scale: float = 0.5, grad: bool = False):
    """Random raw logits per level for a 128x128 input."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(batch, na, IMG // int(s), IMG // int(s), 5 + nc, generator=g) * scale for s in STRIDES]
    return [p.requires_grad_(grad) for p in out]


TARGETS = torch.tensor([[0, 1, 0.30, 0.40, 0.20, 0.25],
                        [0, 2, 0.70, 0.65, 0.45, 0.50],
                        [1, 0, 0.50, 0.50, 0.10, 0.08]])


def logit(p: float) -> float:
    """Inverse sigmoid."""
    return math.log(p / (1 - p))


# ------------------------------------------------------------------------------------------------ basics
def test_zero_targets_only_objectness():
    total, items = YoloLoss(head(), Hyp())(preds(), torch.zeros(0, 6), (2, 3, IMG, IMG))
    assert torch.isfinite(total) and total > 0
    assert items[0] == 0 and items[2] == 0 and items[1] > 0
    # total = (box + obj + cls) * batch size
    assert torch.isclose(total, items.sum() * 2)


def test_loss_scalar_items_and_gradient():
    p = preds(grad=True)
    total, items = YoloLoss(head(), load_hyp("p5").scaled(3, 3, IMG))(p, TARGETS, (2, 3, IMG, IMG))
    assert total.dim() == 0 and items.shape == (3,) and not items.requires_grad
    assert bool((items > 0).all())
    total.backward()
    for lvl in p:
        assert lvl.grad is not None and torch.isfinite(lvl.grad).all()
    # box/cls gradients reach the positives, objectness reaches every cell
    assert sum(float(lvl.grad[..., :4].abs().sum()) for lvl in p) > 0
    assert bool((p[0].grad[..., 4] != 0).all())


def test_imgs_shape_can_be_a_tensor_or_omitted():
    loss = YoloLoss(head(), Hyp())
    a, _ = loss(preds(), TARGETS, torch.zeros(2, 3, IMG, IMG))
    b, _ = loss(preds(), TARGETS)
    c, _ = loss(preds(), TARGETS, (IMG, IMG))
    assert torch.allclose(a, b) and torch.allclose(a, c)


def _perfect_preds(nc: int = 3) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One GT on P3 and predictions where exactly one candidate decodes to it (others: tiny boxes)."""
    # GT 10x13 px = anchor 0 of P3, centre (8.25, 4.75) grid units at stride 8.
    t = torch.tensor([[0, 2, 8.25 * 8 / IMG, 4.75 * 8 / IMG, 10 / IMG, 13 / IMG]])
    p = [torch.zeros(1, 3, IMG // int(s), IMG // int(s), 5 + nc) for s in STRIDES]
    for lvl in p:
        lvl[..., 2:4] = -20.0  # tiny boxes: IoU ~ 0, so dynamic k = 1
        lvl[..., 4] = -8.0
        lvl[..., 5:] = -8.0
    p[0][0, 0, 4, 8, :4] = torch.tensor([logit(0.375), logit(0.625), 0.0, 0.0])
    p[0][0, 0, 4, 8, 4] = 8.0
    p[0][0, 0, 4, 8, 5 + 2] = 8.0
    return [x.requires_grad_() for x in p], t


def test_perfect_prediction_has_near_zero_box_loss():
    p, t = _perfect_preds()
    total, items = YoloLoss(head(), Hyp())(p, t, (1, 3, IMG, IMG))
    assert items[0] < 1e-5
    assert items[2] < 0.01  # confident and right class
    assert items[1] < 0.01  # obj target = IoU = 1 at the positive, 0 elsewhere, all confident
    total.backward()
    assert torch.isfinite(p[0].grad).all()


def test_objectness_target_is_detached_iou():
    # moving the box away lowers the IoU: the objectness loss at a confident cell rises
    p, t = _perfect_preds()
    base = YoloLoss(head(), Hyp()).components(p, t)["obj"]
    p2 = [x.detach().clone() for x in p]
    p2[0][0, 0, 4, 8, 2:4] = 0.6  # bigger box
    worse = YoloLoss(head(), Hyp()).components(p2, t)["obj"]
    assert worse > base


def test_single_class_skips_class_loss():
    t = TARGETS.clone()
    t[:, 1] = 0
    _, items = YoloLoss(head(nc=1), Hyp())(preds(nc=1), t)
    assert items[2] == 0 and items[0] > 0


def test_label_smoothing_changes_class_loss():
    a = YoloLoss(head(), Hyp())(preds(), TARGETS)[1]
    b = YoloLoss(head(), Hyp(label_smoothing=0.1))(preds(), TARGETS)[1]
    assert torch.allclose(a[:2], b[:2]) and a[2] != b[2]


def test_focal_gamma_reduces_bce():
    x, y = torch.randn(50), (torch.rand(50) > 0.5).float()
    assert bce(x, y, gamma=1.5) < bce(x, y)
    assert torch.isclose(bce(x, y), torch.nn.functional.binary_cross_entropy_with_logits(x, y))


def test_plain_candidates_without_ota():
    a = YoloLoss(head(), Hyp(loss_ota=0))(preds(), TARGETS)
    b = YoloLoss(head(), Hyp())(preds(), TARGETS)
    assert torch.isfinite(a[0]) and not torch.allclose(a[1], b[1])


def test_level_without_positives_runs_on_cpu():
    # a single small GT only reaches P3 (anchor filter): P4/P5 get no positives (official code: cuda:0 crash)
    t = torch.tensor([[0, 0, 0.5, 0.5, 10 / IMG, 13 / IMG]])
    total, items = YoloLoss(head(), Hyp())(preds(batch=1), t)
    assert torch.isfinite(total) and items[0] > 0


def test_balance_per_level():
    assert objectness_balance(3) == (4.0, 1.0, 0.4)
    assert objectness_balance(4) == (4.0, 1.0, 0.25, 0.06)
    with pytest.raises(ConfigError):
        objectness_balance(6)


def test_objectness_balance_applied():
    # zero targets: obj loss = sum_l balance_l * BCE_l; scaling P5 logits changes only the 0.4-weighted term
    p = preds()
    loss = YoloLoss(head(), Hyp(obj=1.0))
    expected = sum(w * bce(x[..., 4], torch.zeros_like(x[..., 4])) for w, x in zip((4.0, 1.0, 0.4), p, strict=True))
    assert torch.isclose(loss.components(p, torch.zeros(0, 6))["obj"], expected)


def test_four_levels():
    strides = (8.0, 16.0, 32.0, 64.0)
    h = HeadInfo(2, 4, 3, strides, torch.ones(4, 3, 2) * torch.tensor([1.0, 2.0, 3.0])[None, :, None])
    p = [torch.randn(1, 3, 256 // int(s), 256 // int(s), 7) for s in strides]
    total, items = YoloLoss(h, load_hyp("p6").scaled(4, 2, 256))(p, TARGETS[:2, :].clone().index_fill_(
        1, torch.tensor([1]), 1.0))
    assert torch.isfinite(total) and bool((items > 0).all())


def test_components_allow_extra_terms():
    loss = YoloLoss(head(), Hyp())
    parts = loss.components(preds(), TARGETS)
    assert set(parts) == {"box", "obj", "cls"}
    total, items = loss.combine({**parts, "distill": torch.tensor(0.5)}, batch_size=2)
    assert torch.isclose(total, (items.sum() + 0.5) * 2)


def test_bad_inputs_raise():
    loss = YoloLoss(head(), Hyp())
    with pytest.raises(ConfigError):
        loss(preds()[:2], TARGETS)
    with pytest.raises(ConfigError):
        loss(preds(nc=4), TARGETS)
    with pytest.raises(DataError):
        loss(preds(), TARGETS[:, :5])
    bad = TARGETS.clone()
    bad[0, 1] = 3
    with pytest.raises(DataError, match="class"):
        loss(preds(), bad)
    bad = TARGETS.clone()
    bad[0, 0] = 2  # batch of 2
    with pytest.raises(DataError, match="image index"):
        loss(preds(), bad)
    with pytest.raises(ConfigError):
        HeadInfo(3, 3, 3, STRIDES, torch.zeros(3, 2, 2))


# ------------------------------------------------------------------------------------------------ aux head
def test_aux_loss_depends_on_aux_predictions_only_through_aux_terms():
    h = head(has_aux=True)
    lead = preds(seed=0)
    aux_a, aux_b = preds(seed=1), preds(seed=2)
    loss = YoloLoss(h, Hyp())
    la, _ = loss(lead + aux_a, TARGETS)
    lb, _ = loss(lead + aux_b, TARGETS)
    assert not torch.isclose(la, lb)
    # aux terms weigh 0.25: equal aux and lead predictions -> terms between lead-only and 1.25 x lead-only
    lead_only = YoloLoss(h, Hyp()).components(lead, TARGETS)
    both = YoloLoss(h, Hyp()).components(lead + [x.clone() for x in lead], TARGETS)
    assert both["obj"] > lead_only["obj"]
    assert torch.isclose(both["obj"], 1.25 * lead_only["obj"], rtol=0.05)


def test_aux_assignment_comes_from_the_lead():
    # gradients w.r.t. aux predictions exist; the assignment ignores them (same positives for any aux)
    h = head(has_aux=True)
    lead = preds(seed=0)
    aux = preds(seed=1, grad=True)
    total, _ = YoloLoss(h, Hyp())(lead + aux, TARGETS)
    total.backward()
    assert sum(float(a.grad[..., :4].abs().sum()) for a in aux) > 0
    aux_zero = [torch.zeros_like(a, requires_grad=True) for a in aux]
    total, _ = YoloLoss(h, Hyp())(lead + aux_zero, TARGETS)
    total.backward()
    # positives = where the box gradient is non-zero; identical for both aux inputs
    pos1 = [a.grad[..., 0] != 0 for a in aux]
    pos2 = [a.grad[..., 0] != 0 for a in aux_zero]
    assert all(torch.equal(x, y) for x, y in zip(pos1, pos2, strict=True))


def test_aux_preds_rejected_without_aux_head():
    with pytest.raises(ConfigError):
        YoloLoss(head(), Hyp())(preds() + preds(), TARGETS)


# ------------------------------------------------------------------------------------------------ anchor-free
def test_anchor_free_loss_finite_and_learns():
    torch.manual_seed(0)
    h = head(anchor_free=True)
    p = [torch.nn.Parameter(x) for x in preds(na=1, scale=0.1)]
    loss = YoloLoss(h, load_hyp("p5").scaled(3, 3, IMG))
    opt = torch.optim.SGD(p, lr=0.5, momentum=0.9)
    history = []
    for _ in range(15):
        total, items = loss(p, TARGETS)
        assert torch.isfinite(total) and items.shape == (3,)
        history.append((float(total.detach()), items))
        opt.zero_grad()
        total.backward()
        opt.step()
    assert history[-1][0] < 0.85 * history[0][0]
    assert history[-1][1][0] < 0.6 * history[0][1][0]  # box loss: the matched boxes move onto the GTs


def test_anchor_free_box_losses_and_zero_targets():
    h = head(anchor_free=True)
    for kind in ("ciou", "diou", "giou"):
        total, items = YoloLoss(h, Hyp(), box_loss=kind)(preds(na=1), TARGETS)
        assert torch.isfinite(total) and items[0] > 0
    _, items = YoloLoss(h, Hyp())(preds(na=1), torch.zeros(0, 6))
    assert items[0] == 0 and items[2] == 0
    with pytest.raises(ConfigError):
        YoloLoss(h, Hyp(), box_loss="l1")


# ------------------------------------------------------------------------------------------------ HeadInfo
def test_head_info_from_duck_typed_detector():
    det = SimpleNamespace(nc=5, strides=[8, 16, 32],
                          head=SimpleNamespace(nl=3, na=3, anchors=ANCHORS.clone(), anchor_free=False, has_aux=True))
    h = HeadInfo.from_detector(det)
    assert (h.nc, h.nl, h.na, h.strides, h.has_aux, h.anchor_free) == (5, 3, 3, (8.0, 16.0, 32.0), True, False)
    assert torch.equal(h.anchors, ANCHORS)
    det.head.anchors.zero_()  # a snapshot, not a view of the module buffer
    assert not torch.equal(h.anchors, det.head.anchors)


# ------------------------------------------------------------------------------------------------ hyp
def test_builtin_hyp_values():
    p5, p6, tiny = load_hyp("p5"), load_hyp("p6"), load_hyp("tiny")
    assert p5 == Hyp()
    assert (p6.lrf, p6.scale, p6.mixup) == (0.2, 0.9, 0.15)
    assert (tiny.lrf, tiny.cls, tiny.obj, tiny.translate, tiny.scale, tiny.mixup, tiny.paste_in) == (
        0.01, 0.5, 1.0, 0.1, 0.5, 0.05, 0.05)
    for h in (p5, p6, tiny):
        assert (h.lr0, h.momentum, h.weight_decay, h.box, h.anchor_t, h.aux_weight) == (
            0.01, 0.937, 0.0005, 0.05, 4.0, 0.25)


def test_hyp_scaling_matches_train_py():
    s = load_hyp("p5").scaled(3, 80, 640)
    assert (s.box, s.cls, s.obj) == pytest.approx((0.05, 0.3, 0.7))
    s = load_hyp("p6").scaled(4, 80, 1280)
    assert (s.box, s.cls, s.obj) == pytest.approx((0.0375, 0.225, 2.1))
    s = load_hyp("tiny").scaled(3, 1, 320)
    assert (s.box, s.cls, s.obj) == pytest.approx((0.05, 0.5 / 80, 0.25))


def test_hyp_file_errors_name_file_and_key(tmp_path):
    f = tmp_path / "h.yaml"
    f.write_text("lr0: 0.02\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_hyp(f)
    assert e.value.path == str(f) and e.value.field == "bogus"
    f.write_text("lr0: fast\n")
    with pytest.raises(ConfigError) as e:
        load_hyp(f)
    assert e.value.field == "lr0" and str(f) in str(e.value)
    f.write_text("loss_ota: 0.5\n")
    with pytest.raises(ConfigError):
        load_hyp(f)
    f.write_text("lr0: 0.02\nmosaic: 1\n")  # ints are fine for float keys
    assert load_hyp(f).lr0 == 0.02 and load_hyp(f).mosaic == 1.0
    with pytest.raises(ConfigError):
        load_hyp(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError):
        Hyp().replace(box=True)


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["ota", "aux", "anchor_free"])
def test_cuda_matches_cpu(kind):
    h = head(anchor_free=True) if kind == "anchor_free" else head(has_aux=kind == "aux")
    p = preds(na=h.na, batch=2) + (preds(seed=1) if kind == "aux" else [])
    _, cpu_items = YoloLoss(h, Hyp())(p, TARGETS)
    gpu = [x.cuda().requires_grad_() for x in p]
    total, items = YoloLoss(h, Hyp())(gpu, TARGETS)  # targets on the CPU: moved by the loss
    total.backward()
    assert total.device.type == "cuda" and torch.allclose(items.cpu(), cpu_items, rtol=1e-4, atol=1e-6)
    assert all(torch.isfinite(x.grad).all() for x in gpu)


def test_collapsed_boxes_keep_the_loss_finite():
    # a wh logit below about -50 underflows (2 sigmoid)^2 to 0: CIoU's w/h would be 0/0 without the floor
    p = preds(grad=True)
    with torch.no_grad():
        for lvl in p:
            lvl[..., 2:4] = -120.0
    total, items = YoloLoss(head(), load_hyp("p5").scaled(3, 3, IMG))(p, TARGETS, (2, 3, IMG, IMG))
    assert torch.isfinite(total) and items[0] > 0
    total.backward()
    assert all(torch.isfinite(lvl.grad).all() for lvl in p)
