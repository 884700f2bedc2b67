"""Label assignment for YOLOv7 losses: candidate cells, SimOTA (dynamic k), lead-guided and anchor-free.

Conventions (see docs/loss.md and CONTRACTS.md):
* targets: float [n, 6] rows `(image_idx, class, cx, cy, w, h)`, xywh normalised to [0, 1];
* predictions: per level raw logits `[B, na, H, W, 5 + nc]`;
* anchors: `[nl, na, 2]` in grid units (pixels / stride).
Every function is pure (no state, no grad) and runs on whatever device its inputs live on.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou

# Offsets (dx, dy) of the centre cell and its left, up, right, down neighbours, in YOLOv7's order;
# a neighbour is reached by subtracting offset * g from the GT centre.
_OFFSETS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))
# Cost added to (GT, point) pairs outside the anchor-free centre prior: large enough to lose to any
# real pair, finite so that a GT without any in-prior point still gets its cheapest outside points.
_OUTSIDE_PRIOR_COST = 1e5
# Cost of a pair that may not be matched (GT and candidate from different images): above any real cost.
_INVALID_COST = 1e9
# Images are matched in chunks of dense [GT, candidate] matrices of at most this many elements: far
# fewer kernel launches than one image at a time, bounded memory on crowded batches.
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class Positives:
    """Matched (or candidate) prediction cells of one level, one entry per (cell, target) pair."""

    b: Tensor  # long [n] image index
    a: Tensor  # long [n] anchor index
    gj: Tensor  # long [n] grid row
    gi: Tensor  # long [n] grid column
    t: Tensor  # long [n] row of the `targets` tensor this entry is matched to
    anchors: Tensor  # float [n, 2] anchor wh in grid units (zeros for anchor-free)

    def __len__(self) -> int:
        """Number of entries."""
        return int(self.b.shape[0])

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> Positives:
        """No entries, on `device` (never a hard-coded CUDA device)."""
        z = torch.zeros(0, dtype=torch.long, device=device)
        return Positives(z, z, z, z, z, torch.zeros(0, 2, device=device))

    def select(self, mask: Tensor) -> Positives:
        """Entries where `mask` (bool or index tensor) selects."""
        if mask.dtype == torch.bool:
            mask = mask.nonzero(as_tuple=True)[0]  # one nonzero (host sync) instead of one per field
        return Positives(self.b[mask], self.a[mask], self.gj[mask], self.gi[mask], self.t[mask],
                         self.anchors[mask])

    @staticmethod
    def cat(parts: Sequence[Positives], device: torch.device | str = "cpu") -> Positives:
        """Concatenate entries (empty result when `parts` is empty)."""
        if not parts:
            return Positives.empty(device)
        return Positives(*(torch.cat([getattr(p, f) for p in parts]) for f in ("b", "a", "gj", "gi", "t",
                                                                              "anchors")))


def grid_shapes_of(preds: Sequence[Tensor]) -> list[tuple[int, int]]:
    """(H, W) of each level's raw prediction `[B, na, H, W, no]`."""
    return [(int(p.shape[2]), int(p.shape[3])) for p in preds]


def decode_grid(raw_xywh: Tensor, gi: Tensor, gj: Tensor, anchors: Tensor, anchor_free: bool) -> Tensor:
    """Decode raw box logits at cells (gi, gj) to cxcywh in grid units (the CONTRACTS.md parameterisation)."""
    cell = torch.stack((gi, gj), dim=1).to(raw_xywh.dtype)
    if anchor_free:
        xy = raw_xywh[:, :2] + cell
        wh = raw_xywh[:, 2:4].exp()
    else:
        # YOLOv7: centre offset in (-0.5, 1.5) around the cell corner, wh in (0, 4) anchors.
        xy = raw_xywh[:, :2].sigmoid() * 2.0 - 0.5 + cell
        wh = (raw_xywh[:, 2:4].sigmoid() * 2.0) ** 2 * anchors
    return torch.cat((xy, wh), dim=1)


def find_positive_candidates(targets: Tensor, anchors: Tensor, grid_shapes: Sequence[tuple[int, int]],
                             anchor_t: float = 4.0, g: float = 0.5) -> list[Positives]:
    """YOLOv7 `find_3_positive` (g=0.5) / `find_5_positive` (g=1.0): candidate cells per level."""
    device = targets.device
    nt, na = int(targets.shape[0]), int(anchors.shape[1])
    out: list[Positives] = []
    if nt == 0:
        return [Positives.empty(device) for _ in grid_shapes]
    # (anchor, target) pairs, anchor-major like the official code so top-k ties break the same way.
    ai = torch.arange(na, device=device).repeat_interleave(nt)
    ti = torch.arange(nt, device=device).repeat(na)
    offsets = torch.tensor(_OFFSETS, device=device) * g
    for level, (h, w) in enumerate(grid_shapes):
        size = torch.tensor([w, h], dtype=targets.dtype, device=device)
        gxy = targets[ti, 2:4] * size
        gwh = targets[ti, 4:6] * size
        anc = anchors[level].to(device=device, dtype=targets.dtype)[ai]
        # Anchor ratio filter: a shape more than anchor_t times off in w or h cannot be reached
        # by wh = (2*sigmoid)^2 * anchor (at most 4x), so the pair is dropped.
        r = gwh / anc
        keep = (torch.maximum(r, 1.0 / r).amax(dim=1) < anchor_t).nonzero(as_tuple=True)[0]
        gxy, a, t, anc = gxy[keep], ai[keep], ti[keep], anc[keep]
        gxi = size - gxy  # distance to the right/bottom border
        # A neighbour is added when the centre lies in that half (g=0.5) of the cell, or always
        # (g=1.0), and is not beyond the border ("> 1" keeps the neighbour index >= 0).
        near_lo = ((gxy % 1.0) < g) & (gxy > 1.0)
        near_hi = ((gxi % 1.0) < g) & (gxi > 1.0)
        use = torch.stack((torch.ones_like(near_lo[:, 0]), near_lo[:, 0], near_lo[:, 1], near_hi[:, 0],
                           near_hi[:, 1]))  # [5, n]
        k_idx, p_idx = use.nonzero(as_tuple=True)  # offset-major, then pair, as in the official repeat
        cells = (gxy[p_idx] - offsets[k_idx]).long()
        gi = cells[:, 0].clamp(0, w - 1)
        gj = cells[:, 1].clamp(0, h - 1)
        out.append(Positives(targets[t[p_idx], 0].long(), a[p_idx], gj, gi, t[p_idx], anc[p_idx]))
    return out


def simota_cost(cls_logits: Tensor, obj_logits: Tensor, gt_cls: Tensor, iou: Tensor,
                iou_weight: float = 3.0) -> Tensor:
    """SimOTA cost [n_gt, n_cand] = BCE(sqrt(sig(cls)*sig(obj)), onehot) summed over classes + 3*(-log IoU)."""
    # log y and log(1 - y) for y = sqrt(sig(cls) * sig(obj)), computed stably in log space and clamped
    # at -100 like torch's binary_cross_entropy.
    log_y = (0.5 * (torch.nn.functional.logsigmoid(cls_logits.float())
                    + torch.nn.functional.logsigmoid(obj_logits.float()[:, None]))).clamp(min=-100.0)
    log_1my = torch.log1p(-log_y.exp()).clamp(min=-100.0)
    # BCE against a one-hot row = sum_c -log(1-y_c) - (log y_k - log(1-y_k)) for the GT class k;
    # this avoids materialising the [n_gt, n_cand, nc] tensor of the textbook form.
    neg_sum = -log_1my.sum(dim=1)  # [n_cand]
    k = gt_cls.long()
    cls_cost = neg_sum[None, :] - (log_y[:, k] - log_1my[:, k]).T
    return cls_cost + iou_weight * -torch.log(iou + 1e-8)


def _match(cost: Tensor, iou: Tensor, topk: int, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dense SimOTA matching: (fg [n_cand] bool, matched GT for every candidate [n_cand]); no host syncs.

    `valid` [n_gt, n_cand] marks the pairs that may match (several images in one matrix); invalid pairs
    get IoU 0 (they do not raise dynamic k) and a cost above every valid pair.
    """
    if valid is not None:
        iou = iou * valid
        cost = torch.where(valid, cost, torch.full_like(cost, _INVALID_COST))
    k_cap = min(topk, cost.shape[1])
    ks = iou.topk(k_cap, dim=1).values.sum(dim=1).int().clamp(min=1)  # int() truncates, as in the official code
    # k_g <= k_cap because every IoU <= 1, so the k_cap cheapest hold each GT's k_g cheapest (sorted).
    cheapest = cost.topk(k_cap, dim=1, largest=False).indices
    take = torch.arange(k_cap, device=cost.device)[None, :] < ks[:, None]
    matching = torch.zeros_like(cost, dtype=torch.bool).scatter_(1, cheapest, take)
    if valid is not None:
        matching &= valid  # a GT with no valid candidate still "takes" k = 1 (max(1, .)): drop it
    # A candidate chosen by several GTs goes to the GT of lowest cost over ALL GTs (official: argmin of
    # the whole cost column, not only among the GTs that chose it).
    shared = matching.sum(dim=0) > 1
    best = torch.zeros_like(matching).scatter_(0, cost.argmin(dim=0, keepdim=True), True)
    matching = torch.where(shared[None, :], best, matching)
    return matching.any(dim=0), matching.to(torch.uint8).argmax(dim=0)


def dynamic_k_matching(cost: Tensor, iou: Tensor, topk: int = 10) -> tuple[Tensor, Tensor]:
    """SimOTA matching: GT g takes its k_g cheapest candidates, k_g = max(1, int(sum of top-`topk` IoUs)).

    Returns (fg_mask [n_cand] bool, matched_gt [n_fg] long); a candidate wanted by several GTs goes
    to the GT with the lowest cost.
    """
    n_gt, n_cand = cost.shape
    if n_gt == 0 or n_cand == 0:
        return (torch.zeros(n_cand, dtype=torch.bool, device=cost.device),
                torch.zeros(0, dtype=torch.long, device=cost.device))
    fg, gt = _match(cost, iou, topk)
    return fg, gt[fg]


def _gt_xyxy(targets: Tensor, img_hw: tuple[int, int]) -> Tensor:
    """Normalised cxcywh target boxes -> xyxy pixels (x scaled by width, y by height)."""
    h, w = img_hw
    scale = torch.tensor([w, h, w, h], dtype=targets.dtype, device=targets.device)
    return box_convert(targets[:, 2:6] * scale, "cxcywh", "xyxy")


def _per_image(image_idx: Tensor, batch: int) -> dict[int, Tensor]:
    """Row indices (original order) of each non-empty image, with ONE host sync."""
    order = torch.argsort(image_idx, stable=True)
    out, start = {}, 0
    for b, n in enumerate(torch.bincount(image_idx, minlength=batch).tolist()):
        if n:
            out[b] = order[start:start + n]
        start += n
    return out


ExtraCost = Callable[[Tensor, Tensor], Tensor]


def _match_pool(pool_b: Tensor, raw: Tensor, boxes: Tensor, targets: Tensor, gt_xyxy: Tensor, batch: int,
                topk: int, extra_cost: ExtraCost | None = None) -> tuple[Tensor, Tensor]:
    """SimOTA over a candidate pool of a whole batch: (pool indices of the positives, their target rows).

    raw: candidate logits [n, 5 + nc]; boxes: decoded xyxy pixels [n, 4]; extra_cost(target_rows,
    pool_indices) -> [g, n] is added to the cost (the anchor-free centre prior).
    """
    cands, gts = _per_image(pool_b, batch), _per_image(targets[:, 0].long(), batch)
    images = [b for b in cands if b in gts]
    chunks: list[list[int]] = []
    n_gt = n_cand = 0
    for b in images:  # greedy chunks of images whose [GT, candidate] matrix stays under the budget
        g, c = len(gts[b]), len(cands[b])
        if not chunks or (n_gt + g) * (n_cand + c) > _CHUNK_ELEMENTS:
            chunks.append([])
            n_gt = n_cand = 0
        chunks[-1].append(b)
        n_gt, n_cand = n_gt + g, n_cand + c
    keep, fgs, matched = [], [], []
    for chunk in chunks:
        idx = torch.cat([cands[b] for b in chunk])
        rows = torch.cat([gts[b] for b in chunk])
        iou = box_iou(gt_xyxy[rows], boxes[idx])
        cost = simota_cost(raw[idx, 5:], raw[idx, 4], targets[rows, 1], iou)
        if extra_cost is not None:
            cost = cost + extra_cost(rows, idx)
        same = targets[rows, 0].long()[:, None] == pool_b[idx][None, :] if len(chunk) > 1 else None
        fg, gt = _match(cost, iou, topk, same)
        keep.append(idx)
        fgs.append(fg)
        matched.append(rows[gt])
    if not keep:
        empty = torch.zeros(0, dtype=torch.long, device=pool_b.device)
        return empty, empty
    fg = torch.cat(fgs)
    return torch.cat(keep)[fg], torch.cat(matched)[fg]


@torch.no_grad()
def simota_assign(preds: Sequence[Tensor], targets: Tensor, candidates: Sequence[Positives],
                  strides: Sequence[float], img_hw: tuple[int, int], topk: int = 10,
                  anchor_free: bool = False) -> list[Positives]:
    """YOLOv7 SimOTA (ComputeLossOTA.build_targets): per image, match GTs to the pooled candidates of all levels."""
    nl = len(preds)
    device = preds[0].device
    # Pool the candidates of every level (level-major, like the official per-image concatenation);
    # candidates made by one GT may be taken by any GT of the image, duplicates included.
    pool = Positives.cat(list(candidates), device)
    if len(pool) == 0 or targets.shape[0] == 0:
        return [Positives.empty(device) for _ in range(nl)]
    level = torch.cat([torch.full((len(c),), i, dtype=torch.long, device=device) for i, c in enumerate(candidates)])
    raw = torch.cat([preds[i][c.b, c.a, c.gj, c.gi].float() for i, c in enumerate(candidates)])
    stride = torch.tensor([float(s) for s in strides], device=device)[level]
    boxes = box_convert(decode_grid(raw[:, :4], pool.gi, pool.gj, pool.anchors, anchor_free) * stride[:, None],
                        "cxcywh", "xyxy")
    sel, t = _match_pool(pool.b, raw, boxes, targets, _gt_xyxy(targets.float(), img_hw), int(preds[0].shape[0]),
                         topk)
    out = pool.select(sel)
    out.t = t
    return [out.select(level[sel] == i) for i in range(nl)]


def lead_guided_assign(lead_preds: Sequence[Tensor], targets: Tensor, anchors: Tensor,
                       strides: Sequence[float], img_hw: tuple[int, int], anchor_t: float = 4.0,
                       topk: int = 20) -> tuple[list[Positives], list[Positives]]:
    """AuxOTA: (fine, coarse) labels, both from the LEAD predictions; fine = 3-cell, coarse = 5-cell candidates."""
    shapes = grid_shapes_of(lead_preds)
    fine = simota_assign(lead_preds, targets, find_positive_candidates(targets, anchors, shapes, anchor_t, 0.5),
                         strides, img_hw, topk)
    coarse = simota_assign(lead_preds, targets,
                           find_positive_candidates(targets, anchors, shapes, anchor_t, 1.0),
                           strides, img_hw, topk)
    return fine, coarse


def _grid_points(grid_shapes: Sequence[tuple[int, int]], strides: Sequence[float],
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """All cells of all levels: (level, gj, gi, stride, centre xy in pixels), level -> row -> column order."""
    lv, gjs, gis, st = [], [], [], []
    for lvl, (h, w) in enumerate(grid_shapes):
        gj, gi = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        gjs.append(gj.reshape(-1))
        gis.append(gi.reshape(-1))
        lv.append(torch.full((h * w,), lvl, dtype=torch.long, device=device))
        st.append(torch.full((h * w,), float(strides[lvl]), device=device))
    level, gj, gi, stride = torch.cat(lv), torch.cat(gjs), torch.cat(gis), torch.cat(st)
    centre = (torch.stack((gi, gj), dim=1).float() + 0.5) * stride[:, None]
    return level, gj, gi, stride, centre


def centre_prior(gt_xyxy: Tensor, centre: Tensor, stride: Tensor, radius: float = 2.5) -> tuple[Tensor, Tensor]:
    """YOLOX geometry prior: (point centre inside the GT box, point within `radius` strides of the GT centre)."""
    x, y = centre[None, :, 0], centre[None, :, 1]
    in_box = ((x > gt_xyxy[:, 0:1]) & (x < gt_xyxy[:, 2:3]) & (y > gt_xyxy[:, 1:2]) & (y < gt_xyxy[:, 3:4]))
    gc = (gt_xyxy[:, :2] + gt_xyxy[:, 2:]) / 2
    r = radius * stride[None, :]
    in_ctr = ((x - gc[:, 0:1]).abs() < r) & ((y - gc[:, 1:2]).abs() < r)
    return in_box, in_ctr


@torch.no_grad()
def anchor_free_assign(preds: Sequence[Tensor], targets: Tensor, strides: Sequence[float],
                       img_hw: tuple[int, int], center_radius: float = 2.5, topk: int = 10) -> list[Positives]:
    """YOLOX SimOTA for the anchor-free head (na=1): centre-prior candidates, dynamic k, cls + 3*IoU cost."""
    nl, batch = len(preds), int(preds[0].shape[0])
    device = preds[0].device
    if targets.shape[0] == 0:
        return [Positives.empty(device) for _ in range(nl)]
    level, gj, gi, stride, centre = _grid_points(grid_shapes_of(preds), strides, device)
    gt_xyxy = _gt_xyxy(targets.float(), img_hw)
    # Candidates of an image: the points inside the box or the centre region of any of its GTs
    # (the prior depends only on the grid, so it is computed once for all GTs of the batch).
    in_box, in_ctr = centre_prior(gt_xyxy, centre, stride, center_radius)
    hits = torch.zeros(batch, centre.shape[0], dtype=torch.int32, device=device)
    hits.index_add_(0, targets[:, 0].long(), (in_box | in_ctr).int())
    cand_b, point = hits.nonzero(as_tuple=True)
    # [B, N, no] in level -> row -> column order, the order of _grid_points (na = 1).
    flat = torch.cat([p.reshape(batch, -1, p.shape[-1]) for p in preds], dim=1)
    raw = flat[cand_b, point].float()
    boxes = box_convert(decode_grid(raw[:, :4], gi[point], gj[point], stride.new_zeros(0), True)
                        * stride[point, None], "cxcywh", "xyxy")

    def outside_prior(rows: Tensor, idx: Tensor) -> Tensor:
        """Large cost for (GT, point) pairs not both inside the box and the centre region."""
        ib, ic = in_box[rows][:, point[idx]], in_ctr[rows][:, point[idx]]
        return _OUTSIDE_PRIOR_COST * ~(ib & ic)

    sel, t = _match_pool(cand_b, raw, boxes, targets, gt_xyxy, batch, topk, outside_prior)
    out = Positives(cand_b[sel], torch.zeros_like(sel), gj[point[sel]], gi[point[sel]], t,
                    torch.zeros(sel.numel(), 2, device=device))
    return [out.select(level[point[sel]] == i) for i in range(nl)]
