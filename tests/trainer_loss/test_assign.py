"""Candidate cells, SimOTA dynamic-k matching, lead-guided and anchor-free assignment."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.assign import (
    anchor_free_assign,
    centre_prior,
    dynamic_k_matching,
    find_positive_candidates,
    lead_guided_assign,
    simota_assign,
    simota_cost,
)


def logit(p: float) -> float:
    """Inverse sigmoid."""
    return math.log(p / (1 - p))


def cells(pos) -> set[tuple[int, int, int, int]]:
    """(b, a, gj, gi) tuples of a Positives."""
    return set(zip(pos.b.tolist(), pos.a.tolist(), pos.gj.tolist(), pos.gi.tolist(), strict=True))


def one_gt(cx: float, cy: float, w: float, h: float, grid: int = 10, cls: int = 0, img: int = 0) -> torch.Tensor:
    """A single target row from grid-unit coordinates on a `grid` x `grid` level."""
    return torch.tensor([[img, cls, cx / grid, cy / grid, w / grid, h / grid]])


ANCHOR_2x2 = torch.tensor([[[2.0, 2.0]]])


# ------------------------------------------------------------------------------------------------ candidates
def test_three_cells_left_and_down_neighbour():
    # centre (3.3, 4.7): x fraction < 0.5 -> left neighbour, y fraction > 0.5 -> lower neighbour
    (c,) = find_positive_candidates(one_gt(3.3, 4.7, 2, 2), ANCHOR_2x2, [(10, 10)], g=0.5)
    assert cells(c) == {(0, 0, 4, 3), (0, 0, 4, 2), (0, 0, 5, 3)}
    assert c.t.tolist() == [0, 0, 0]
    assert torch.allclose(c.anchors, torch.tensor([[2.0, 2.0]] * 3))


def test_three_cells_right_and_up_neighbour():
    (c,) = find_positive_candidates(one_gt(3.7, 4.2, 2, 2), ANCHOR_2x2, [(10, 10)], g=0.5)
    assert cells(c) == {(0, 0, 4, 3), (0, 0, 4, 4), (0, 0, 3, 3)}


def test_five_cells_with_g1():
    (c,) = find_positive_candidates(one_gt(3.3, 4.7, 2, 2), ANCHOR_2x2, [(10, 10)], g=1.0)
    assert cells(c) == {(0, 0, 4, 3), (0, 0, 4, 2), (0, 0, 4, 4), (0, 0, 3, 3), (0, 0, 5, 3)}


def test_borders_are_clipped():
    # Near the top-left corner no left/up neighbour exists; near the bottom-right no right/down one.
    (c,) = find_positive_candidates(one_gt(0.3, 0.3, 2, 2), ANCHOR_2x2, [(10, 10)], g=0.5)
    assert cells(c) == {(0, 0, 0, 0)}
    (c,) = find_positive_candidates(one_gt(0.3, 0.3, 2, 2), ANCHOR_2x2, [(10, 10)], g=1.0)
    assert cells(c) == {(0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0)}
    (c,) = find_positive_candidates(one_gt(9.8, 9.8, 2, 2), ANCHOR_2x2, [(10, 10)], g=0.5)
    assert cells(c) == {(0, 0, 9, 9)}
    (c,) = find_positive_candidates(one_gt(9.8, 9.8, 2, 2), ANCHOR_2x2, [(10, 10)], g=1.0)
    assert cells(c) == {(0, 0, 9, 9), (0, 0, 9, 8), (0, 0, 8, 9)}
    # a centre exactly on the last edge stays inside the grid
    (c,) = find_positive_candidates(one_gt(10.0, 10.0, 2, 2), ANCHOR_2x2, [(10, 10)], g=1.0)
    assert c.gi.max() <= 9 and c.gj.max() <= 9


def test_anchor_ratio_filter_drops_mismatched_anchor():
    anchors = torch.tensor([[[2.0, 2.0], [1.0, 3.0], [9.0, 9.0]]])  # 9/2 = 4.5 > anchor_t
    (c,) = find_positive_candidates(one_gt(3.3, 4.7, 2, 2), anchors, [(10, 10)], anchor_t=4.0)
    assert set(c.a.tolist()) == {0, 1}
    assert len(c) == 6
    (c,) = find_positive_candidates(one_gt(3.3, 4.7, 2, 2), anchors, [(10, 10)], anchor_t=5.0)
    assert set(c.a.tolist()) == {0, 1, 2}


def test_levels_use_their_grid_and_image_index():
    t = torch.tensor([[1, 0, 0.33, 0.47, 0.2, 0.2], [0, 2, 0.5, 0.5, 0.2, 0.2]])
    anchors = torch.tensor([[[2.0, 2.0]], [[1.0, 1.0]]])
    c10, c5 = find_positive_candidates(t, anchors, [(10, 10), (5, 5)])
    assert (0 + 1, 0, 4, 3) in cells(c10)  # image 1, GT centre (3.3, 4.7) on the 10x10 grid
    assert (1, 0, 2, 1) in cells(c5)  # (1.65, 2.35) on the 5x5 grid
    assert set(c10.t[c10.b == 0].tolist()) == {1}


def test_no_targets_gives_empty_levels():
    out = find_positive_candidates(torch.zeros(0, 6), ANCHOR_2x2.repeat(2, 1, 1), [(10, 10), (5, 5)])
    assert [len(c) for c in out] == [0, 0]


# ------------------------------------------------------------------------------------------------ matching
def test_simota_cost_equals_textbook_bce():
    torch.manual_seed(0)
    cls, obj = torch.randn(7, 4) * 3, torch.randn(7) * 3
    gt_cls, iou = torch.tensor([0, 3, 3]), torch.rand(3, 7)
    y = (cls.sigmoid() * obj.sigmoid()[:, None]).sqrt()
    onehot = F.one_hot(gt_cls, 4).float()[:, None, :].expand(3, 7, 4)
    ref = F.binary_cross_entropy(y[None].expand(3, 7, 4), onehot, reduction="none").sum(-1)
    ref = ref + 3.0 * -torch.log(iou + 1e-8)
    assert torch.allclose(simota_cost(cls, obj, gt_cls, iou), ref, atol=1e-4)


def test_dynamic_k_single_perfect_candidate():
    iou = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    cost = torch.tensor([[0.1, 5.0, 6.0, 7.0]])
    fg, gt = dynamic_k_matching(cost, iou)
    assert fg.tolist() == [True, False, False, False] and gt.tolist() == [0]


def test_dynamic_k_is_truncated_sum_of_top_ious():
    iou = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.1]])  # sum 3.6 -> k = 3
    cost = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.5]])
    fg, _ = dynamic_k_matching(cost, iou)
    assert fg.tolist() == [False, False, False, True, True, True]  # the 3 cheapest, not the best IoUs
    # top-k caps the sum: with topk=2 only 0.9 + 0.8 count -> k = 1
    fg, _ = dynamic_k_matching(cost, iou, topk=2)
    assert int(fg.sum()) == 1
    # k is at least 1 even with no overlap at all
    fg, _ = dynamic_k_matching(cost, torch.zeros(1, 6))
    assert fg.tolist() == [False] * 5 + [True]


def test_conflict_goes_to_lowest_cost_gt():
    iou = torch.full((2, 3), 0.4)  # k = 1 for both GTs
    cost = torch.tensor([[1.0, 2.0, 3.0],  # GT 0 wants candidate 0 ...
                         [0.5, 9.0, 9.0]])  # ... and GT 1 wants it more
    fg, gt = dynamic_k_matching(cost, iou)
    assert fg.tolist() == [True, False, False] and gt.tolist() == [1]
    iou = torch.full((2, 3), 0.7)  # k = 2 each: candidate 0 shared, candidates 1 and 2 not
    cost = torch.tensor([[1.0, 2.0, 9.0], [0.5, 9.0, 3.0]])
    fg, gt = dynamic_k_matching(cost, iou, topk=3)
    assert fg.tolist() == [True, True, True] and gt.tolist() == [1, 0, 1]


def test_matching_without_candidates():
    fg, gt = dynamic_k_matching(torch.zeros(2, 0), torch.zeros(2, 0))
    assert fg.numel() == 0 and gt.numel() == 0


# ------------------------------------------------------------------------------------------------ SimOTA
def _preds(shape=(1, 1, 10, 10, 7), fill: float = 0.0) -> torch.Tensor:
    return torch.full(shape, fill)


def test_simota_picks_the_perfect_candidate():
    # GT at (3.25, 4.75) grid units, 2x2 = the anchor, stride 8, 2 classes, class 1, image 1 of 2.
    t = one_gt(3.25, 4.75, 2, 2, cls=1, img=1)
    p = _preds((2, 1, 10, 10, 7))
    p[..., 2:4] = -20.0  # every other cell predicts a tiny box: IoU ~ 0
    p[1, 0, 4, 3, :4] = torch.tensor([logit(0.375), logit(0.625), 0.0, 0.0])  # decodes exactly to the GT
    p[1, 0, 4, 3, 4:] = torch.tensor([5.0, -5.0, 5.0])
    cands = find_positive_candidates(t, ANCHOR_2x2, [(10, 10)])
    (m,) = simota_assign([p], t, cands, strides=[8.0], img_hw=(80, 80))
    assert cells(m) == {(1, 0, 4, 3)} and m.t.tolist() == [0]


def test_simota_on_two_levels_and_rectangular_input():
    torch.manual_seed(0)
    t = torch.tensor([[0, 0, 0.3, 0.6, 0.1, 0.2], [0, 1, 0.7, 0.2, 0.3, 0.3], [2, 1, 0.5, 0.5, 0.5, 0.4]])
    anchors = torch.tensor([[[1.0, 1.5], [2.0, 2.0]], [[1.0, 1.0], [2.0, 3.0]]])
    preds = [torch.randn(3, 2, 8, 16, 7), torch.randn(3, 2, 4, 8, 7)]
    cands = find_positive_candidates(t, anchors, [(8, 16), (4, 8)])
    out = simota_assign(preds, t, cands, strides=[8.0, 16.0], img_hw=(64, 128))
    assert sum(len(m) for m in out) >= 3  # every GT gets at least one
    matched_t = torch.cat([m.t for m in out])
    assert set(matched_t.tolist()) == {0, 1, 2}
    for m in out:
        assert set(m.b.tolist()) <= {0, 2}
        assert torch.equal(m.b, t[m.t, 0].long())  # matched within its own image


def test_lead_guided_coarse_contains_fine():
    # Uniform predictions, GT = anchor = 4x4 grid units; IoUs of centre/left/down/right/up cells are
    # .86/.64/.58/.52/.53: fine k = int(2.08) = 2, coarse k = int(3.13) = 3.
    t = one_gt(3.3, 4.6, 4, 4, grid=8)
    preds = [_preds((1, 1, 8, 8, 6))]
    fine, coarse = lead_guided_assign(preds, t, torch.tensor([[[4.0, 4.0]]]), [8.0], (64, 64))
    assert cells(fine[0]) == {(0, 0, 4, 3), (0, 0, 4, 2)}
    assert cells(coarse[0]) == {(0, 0, 4, 3), (0, 0, 4, 2), (0, 0, 5, 3)}
    assert cells(fine[0]) <= cells(coarse[0])


def test_lead_guided_candidates_superset_random():
    torch.manual_seed(1)
    t = torch.cat([torch.randint(0, 2, (6, 1)).float(), torch.zeros(6, 1), torch.rand(6, 2) * 0.8 + 0.1,
                   torch.rand(6, 2) * 0.3 + 0.05], dim=1)
    anchors = torch.tensor([[[1.0, 1.0], [2.0, 3.0], [3.0, 2.0]]])
    f = find_positive_candidates(t, anchors, [(16, 16)], g=0.5)[0]
    c = find_positive_candidates(t, anchors, [(16, 16)], g=1.0)[0]
    assert cells(f) <= cells(c) and len(c) > len(f)


# ------------------------------------------------------------------------------------------------ anchor-free
def test_centre_prior_region():
    gt = torch.tensor([[40.0, 40.0, 60.0, 50.0]])  # centre (50, 45)
    centre = torch.tensor([[44.0, 44.0], [70.0, 45.0], [80.0, 45.0], [45.0, 48.0]])
    in_box, in_ctr = centre_prior(gt, centre, torch.full((4,), 8.0), radius=2.5)  # radius 20 px
    assert in_box.tolist() == [[True, False, False, True]]
    assert in_ctr.tolist() == [[True, False, False, True]]
    _, in_ctr = centre_prior(gt, centre, torch.full((4,), 16.0), radius=2.5)  # radius 40 px
    assert in_ctr.tolist() == [[True, True, True, True]]


def test_anchor_free_assign_prefers_the_perfect_point_and_stays_near():
    # GT box 24x24 px centred at (52, 36) on a 64x64 image, levels stride 8 and 16, class 0 of 1.
    t = torch.tensor([[0, 0, 52 / 64, 36 / 64, 24 / 64, 24 / 64]])
    p8, p16 = _preds((1, 1, 8, 8, 6)), _preds((1, 1, 4, 4, 6))
    p8[..., 2:4] = -10.0
    p16[..., 2:4] = -10.0
    p8[0, 0, 4, 6, :4] = torch.tensor([0.5, 0.5, math.log(3.0), math.log(3.0)])  # (6.5, 4.5)*8, 24 px
    p8[0, 0, 4, 6, 4:] = 6.0
    m8, m16 = anchor_free_assign([p8, p16], t, [8.0, 16.0], (64, 64))
    assert cells(m8) == {(0, 0, 4, 6)} and len(m16) == 0
    # with uniform predictions every GT still gets >= 1 positive, all inside box & centre region
    m8, m16 = anchor_free_assign([_preds((1, 1, 8, 8, 6)), _preds((1, 1, 4, 4, 6))], t, [8.0, 16.0], (64, 64))
    assert len(m8) + len(m16) >= 1
    for m, s in ((m8, 8.0), (m16, 16.0)):
        cx, cy = (m.gi.float() + 0.5) * s, (m.gj.float() + 0.5) * s
        assert bool(((cx - 52).abs() < 2.5 * s).all() and ((cy - 36).abs() < 2.5 * s).all())


def _candidates_by_loops(t: torch.Tensor, anchors: torch.Tensor, h: int, w: int, g: float, anchor_t: float):
    """Straight-loop statement of the official rule, in its (offset, anchor, target) order."""
    out = []
    offsets = [(0, 0), (1, 0), (0, 1), (-1, 0), (0, -1)]
    for k, (ox, oy) in enumerate(offsets):
        for a, (aw, ah) in enumerate(anchors.tolist()):
            for i, row in enumerate(t.tolist()):
                x, y, bw, bh = row[2] * w, row[3] * h, row[4] * w, row[5] * h
                if max(bw / aw, aw / bw, bh / ah, ah / bh) >= anchor_t:
                    continue
                use = [True, x % 1 < g and x > 1, y % 1 < g and y > 1,
                       (w - x) % 1 < g and w - x > 1, (h - y) % 1 < g and h - y > 1][k]
                if use:
                    gi = min(max(int(x - ox * g), 0), w - 1)
                    gj = min(max(int(y - oy * g), 0), h - 1)
                    out.append((int(row[0]), a, gj, gi, i))
    return out


def test_candidates_match_the_rule_stated_as_loops():
    torch.manual_seed(3)
    n = 12
    t = torch.cat([torch.randint(0, 3, (n, 1)).float(), torch.zeros(n, 1), torch.rand(n, 2),
                   torch.rand(n, 2) * 0.4 + 0.01], dim=1)
    anchors = torch.tensor([[[0.5, 0.8], [1.5, 1.0], [3.0, 4.0]]])
    for g in (0.5, 1.0):
        (c,) = find_positive_candidates(t, anchors, [(12, 14)], anchor_t=4.0, g=g)
        got = list(zip(c.b.tolist(), c.a.tolist(), c.gj.tolist(), c.gi.tolist(), c.t.tolist(), strict=True))
        assert got == _candidates_by_loops(t, anchors[0], 12, 14, g, 4.0)


def _as_rows(out) -> list[tuple[int, ...]]:
    """Sorted (level, b, a, gj, gi, t) rows of per-level Positives."""
    return sorted((lvl, *row) for lvl, m in enumerate(out)
                  for row in zip(m.b.tolist(), m.a.tolist(), m.gj.tolist(), m.gi.tolist(), m.t.tolist(), strict=True))


def test_batched_matching_equals_one_image_at_a_time(monkeypatch):
    torch.manual_seed(4)
    n = 24
    t = torch.cat([torch.randint(0, 5, (n, 1)).float(), torch.randint(0, 3, (n, 1)).float(),
                   torch.rand(n, 2) * 0.8 + 0.1, torch.rand(n, 2) * 0.4 + 0.03], dim=1)
    anchors = torch.tensor([[[1.0, 1.5], [2.0, 2.0], [3.0, 1.0]], [[1.0, 1.0], [2.0, 3.0], [3.0, 3.0]]])
    preds = [torch.randn(6, 3, 16, 16, 8), torch.randn(6, 3, 8, 8, 8)]
    cands = find_positive_candidates(t, anchors, [(16, 16), (8, 8)])
    af_preds = [p[:, :1] for p in preds]
    batched = simota_assign(preds, t, cands, [8.0, 16.0], (128, 128))
    af_batched = anchor_free_assign(af_preds, t, [8.0, 16.0], (128, 128))
    monkeypatch.setattr("trainer.assign._CHUNK_ELEMENTS", 1)  # every image in its own matrix
    single = simota_assign(preds, t, cands, [8.0, 16.0], (128, 128))
    af_single = anchor_free_assign(af_preds, t, [8.0, 16.0], (128, 128))
    assert _as_rows(batched) == _as_rows(single) and len(_as_rows(batched)) >= n // 2
    assert _as_rows(af_batched) == _as_rows(af_single) and len(_as_rows(af_batched)) >= n // 2
