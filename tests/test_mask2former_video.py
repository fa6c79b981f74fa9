"""Video Mask2Former (clip queries, T-frame masks, 3-D position encoding) + clip-level RankSeg."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import overfit
from conftest import tiny_m2f_cfg as tiny_cfg

from rankseg_core.families.mask2former import MASK2FORMER, num_queries
from rankseg_core.losses import mask2former as image_losses
from rankseg_core.losses.mask2former import Mask2FormerCriterion
from rankseg_core.losses.mask2former_video import (
    VideoMask2FormerCriterion,
    clip_targets_from_semantic,
    clip_targets_from_tracks,
    video_hungarian_match,
    video_matching_cost,
)
from rankseg_core.losses.rankseg import asymmetric_loss
from rankseg_core.losses.targets import targets_from_semantic
from rankseg_core.model.mask2former.video import VideoMask2FormerModel, VideoMask2FormerOutput, frame_output
from rankseg_core.model.position import sine_position_embedding, sine_position_embedding_3d
from rankseg_core.model.selection import Selection

K = 10


def video_model(seed: int = 0, clip_len: int = 2, **kw) -> VideoMask2FormerModel:
    cfg = tiny_cfg(**kw)
    torch.manual_seed(seed)
    return VideoMask2FormerModel(cfg, MASK2FORMER.arch(cfg.model), num_queries(cfg), clip_len)


def image_model(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MASK2FORMER.build(tiny_cfg(**kw))


def pixel_centres(h: int, w: int) -> torch.Tensor:
    """(x, y) in [0, 1] of every pixel centre, row-major: point_sample there = the pixel value."""
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)


# ----------------------------------------------------------------------------- position


def test_3d_position_encoding_equals_its_formula() -> None:
    t, h, w, d = 3, 4, 5, 8
    pe = sine_position_embedding_3d(t, h, w, d)
    assert pe.shape == (t, d, h, w)
    npf, two_pi = d // 2, 2 * math.pi
    for ti, yi, xi in itertools.product(range(t), range(h), range(w)):
        y, x, z = (yi + 1) / (h + 1e-6) * two_pi, (xi + 1) / (w + 1e-6) * two_pi, (ti + 1) / (t + 1e-6) * two_pi
        for c in range(d):
            # 2-D part: channels [0, npf) encode y, [npf, d) encode x; even sin, odd cos
            coord, cc = (y, c) if c < npf else (x, c - npf)
            f2 = 10000 ** (2 * (cc // 2) / npf)
            v2 = math.sin(coord / f2) if cc % 2 == 0 else math.cos(coord / f2)
            # time part over all d channels, added
            fz = 10000 ** (2 * (c // 2) / d)
            vz = math.sin(z / fz) if c % 2 == 0 else math.cos(z / fz)
            assert abs(float(pe[ti, c, yi, xi]) - (v2 + vz)) < 1e-5, (ti, c, yi, xi)
    # one frame: the 2-D encoding plus the same vector at every position
    one = sine_position_embedding_3d(1, h, w, d) - sine_position_embedding(h, w, d)[None]
    assert torch.allclose(one, one[:, :, :1, :1].expand_as(one), atol=1e-6)


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("t", [1, 2, 3])
def test_shapes_for_clip_lengths(t: int) -> None:
    model = video_model(clip_len=t).eval()
    q = model.num_queries
    with torch.no_grad():
        out = model(torch.randn(2 * t, 3, 64, 64))
    assert isinstance(out, VideoMask2FormerOutput) and out.clip_len == t
    assert out.pred_logits.shape == (2, q, 4 + 1)  # kappa + no-object, per clip
    assert out.pred_masks.shape == (2, q, t, 16, 16)
    assert out.ml_logits is not None and out.ml_logits.shape == (2, K)
    assert out.topk_index is not None and out.topk_index.shape == (2, 4)
    assert len(out.aux) == 3 and all(lg.shape == (2, q, 5) and m.shape == (2, q, t, 16, 16) for lg, m in out.aux)
    frames = frame_output(out)
    assert frames.pred_masks.shape == (2 * t, q, 16, 16) and frames.pred_logits.shape == (2 * t, q, 5)


def test_whole_clips_required() -> None:
    with pytest.raises(ValueError, match="whole clips"):
        video_model(clip_len=2)(torch.randn(3, 3, 64, 64))


@pytest.mark.parametrize("head", ["rankseg", "segmenter"])
def test_one_frame_clip_equals_the_image_model(head: str) -> None:
    """T = 1: the official video decoder differs from the image decoder only by the time
    channels of the 3-D encoding, a constant added to every key, which shifts all of a query's
    attention scores equally (softmax-invariant): the same function on the same weights."""
    img, vid = image_model(head=head).eval(), video_model(head=head, clip_len=1).eval()
    # same seed -> same weights (the decoder is class-swapped, not rebuilt)
    assert list(img.state_dict()) == list(vid.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(img.state_dict().values(), vid.state_dict().values(), strict=True))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = img(x), vid(x)
    assert torch.allclose(a.pred_logits, b.pred_logits, atol=1e-4)
    assert torch.allclose(a.pred_masks, b.pred_masks[:, :, 0], atol=1e-4)
    for (la, ma), (lb, mb) in zip(a.aux, b.aux, strict=True):
        assert torch.allclose(la, lb, atol=1e-4) and torch.allclose(ma, mb[:, :, 0], atol=1e-4)
    if head == "rankseg":
        assert torch.allclose(a.ml_logits, b.ml_logits, atol=1e-4) and torch.equal(a.topk_index, b.topk_index)


def test_clips_are_independent_and_frames_of_a_clip_interact() -> None:
    model = video_model(clip_len=2).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        both = model(x)
        first = model(x[:2])
        changed = x.clone()
        changed[1] = torch.randn(3, 64, 64)  # frame 2 of clip 0
        other = model(changed)
    # the batch groups consecutive frames into clips
    assert torch.allclose(both.pred_masks[:1], first.pred_masks, atol=1e-4)
    assert torch.allclose(both.ml_logits[:1], first.ml_logits, atol=1e-4)
    # clip 1 is untouched; clip 0's queries saw frame 2, so frame 1's mask and the ranking move
    assert torch.allclose(both.pred_masks[1], other.pred_masks[1], atol=1e-4)
    assert not torch.allclose(both.pred_masks[0, :, 0], other.pred_masks[0, :, 0], atol=1e-4)
    assert not torch.allclose(both.ml_logits[0], other.ml_logits[0], atol=1e-4)


def test_attention_mask_spans_the_clip_and_empty_rule_is_per_clip() -> None:
    model = video_model(clip_len=2)
    dec = model.decoder
    d, q = dec.decoder_norm.normalized_shape[0], model.num_queries
    output = torch.randn(1, q, d)
    mf = torch.randn(1, 2, 32, 8, 8)
    emb, masks, attn = dec._predict_clip(output, mf, (8, 8))
    me = dec.mask_embed(dec.decoder_norm(output))
    for t in range(2):  # each frame's mask = the query's embedding against that frame's features
        assert torch.allclose(masks[0, :, t], torch.einsum("qc,chw->qhw", me[0], mf[0, t]), atol=1e-5)
    expect = masks.detach().sigmoid().flatten(2) < 0.5  # 1 x Q x (2*64), t-major
    empty = expect.all(-1, keepdim=True)
    expect &= ~empty
    assert attn.shape == (dec.num_heads, q, 128)
    assert torch.equal(attn[0], expect[0]) and torch.equal(attn[-1], expect[0])
    # a query empty in frame 1 only keeps frame 1 blocked (the rule looks at the whole clip)
    big = torch.zeros(1, q, d)
    mf2 = torch.ones(1, 2, 32, 8, 8)
    mf2[0, 0] = -1.0
    with torch.no_grad():
        for p in dec.mask_embed.parameters():
            p.zero_()
        dec.mask_embed.layers[-1].bias.fill_(1.0)  # mask logit = sum of features: -32 in frame 0, 32 in frame 1
    _, m2, a2 = dec._predict_clip(big, mf2, (8, 8))
    assert bool((m2[0, :, 0] < 0).all()) and bool((m2[0, :, 1] > 0).all())
    assert bool(a2[:, :, :64].all()) and not bool(a2[:, :, 64:].any())
    mf3 = torch.zeros(1, 2, 32, 8, 8) - 1.0  # empty everywhere -> attends everywhere
    _, _, a3 = dec._predict_clip(big, mf3, (8, 8))
    assert not bool(a3.any())


def test_selection_is_shared_by_the_frames_of_a_clip() -> None:
    model = video_model(clip_len=3).eval()
    with torch.no_grad():
        out = model(torch.randn(6, 3, 64, 64))
    frames = frame_output(out)
    assert frames.topk_index is not None and out.topk_index is not None
    for b in range(2):
        for t in range(3):
            assert torch.equal(frames.topk_index[3 * b + t], out.topk_index[b])
            assert torch.equal(frames.pred_logits[3 * b + t], out.pred_logits[b])
            assert torch.equal(frames.pred_masks[3 * b + t], out.pred_masks[b, :, t])
    # the ranking is the argsort of the clip's ml logits
    assert torch.equal(out.topk_index, out.ml_logits.argsort(dim=1, descending=True, stable=True)[:, :4])
    # per-frame override lists are merged per clip
    with torch.no_grad():
        ov = model(torch.randn(6, 3, 64, 64), Selection(override=[torch.tensor([c]) for c in (1, 2, 2, 5, 255, 5)]))
    assert ov.topk_index is not None and ov.valid is not None  # clip 1 has one class: padded
    sets = [set(ov.topk_index[b][ov.valid[b]].tolist()) for b in range(2)]
    assert sets == [{1, 2}, {5}]


def test_gradient_reaches_every_parameter() -> None:
    model = video_model(clip_len=2).train()
    # Zero-initialised weights that block gradients at initialisation by design (timm's zero
    # last BN gamma of each residual block, frozen here; the Deformable-DETR zero weights of
    # the sampling offsets / attention weights, which make the level embedding's gradient 0)
    # get small values, so that "no gradient" can only mean a disconnected parameter.
    with torch.no_grad():
        for name, x in itertools.chain(model.named_parameters(), model.named_buffers()):
            if name.endswith("weight") and x.is_floating_point() and not bool(x.abs().sum() > 0):
                x.normal_(0.0, 0.02)
    crit = VideoMask2FormerCriterion(tiny_cfg())
    lab = torch.randint(0, K, (2, 2, 64, 64))
    lab[:, :, :32] = 3  # a large region so something matches
    out = model(torch.randn(4, 3, 64, 64))
    crit(out, [clip_targets_from_semantic(x, K, 255) for x in lab])["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, missing
    assert out.topk_index is not None and not out.topk_index.requires_grad


# ----------------------------------------------------------------------------- targets


def test_clip_targets_from_tracks_keep_empty_frames() -> None:
    m = torch.zeros(3, 4, 4, dtype=torch.bool)
    m[0, :2] = True
    m[1, 2:] = True
    m[2, :, :1] = True
    frames = [
        {"labels": torch.tensor([4, 2]), "masks": m[:2], "ids": torch.tensor([7, 3])},
        {"labels": torch.tensor([4]), "masks": m[2:], "ids": torch.tensor([7])},  # track 3 absent
    ]
    t = clip_targets_from_tracks(frames)
    assert t["ids"].tolist() == [3, 7] and t["labels"].tolist() == [2, 4]
    assert t["masks"].shape == (2, 2, 4, 4)
    assert torch.equal(t["masks"][0, 0], m[1]) and not bool(t["masks"][0, 1].any())
    assert torch.equal(t["masks"][1, 0], m[0]) and torch.equal(t["masks"][1, 1], m[2])
    with pytest.raises(ValueError, match="track 7"):
        clip_targets_from_tracks([frames[0], {"labels": torch.tensor([5]), "masks": m[2:], "ids": torch.tensor([7])}])
    # a track without pixels in any frame is no target
    none = clip_targets_from_tracks([{"labels": torch.tensor([1]), "masks": torch.zeros(1, 4, 4, dtype=torch.bool),
                                      "ids": torch.tensor([0])}])
    assert none["labels"].numel() == 0


def test_clip_targets_from_semantic_are_the_union_of_the_frames() -> None:
    lab = torch.full((2, 4, 4), 255)
    lab[0, :2] = 1
    lab[1, 2:] = 6
    lab[1, :1] = 1
    t = clip_targets_from_semantic(lab, K, 255)
    assert t["labels"].tolist() == [1, 6]
    assert torch.equal(t["masks"][1, 0], torch.zeros(4, 4, dtype=torch.bool))  # class 6 absent in frame 0
    assert torch.equal(t["masks"][0], lab == 1)


# ----------------------------------------------------------------------------- matcher


def dense_cost(logits: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Independent cost over every pixel of every frame: 2 * -p(class) + 5 * mean BCE + 5 * dice."""
    q, n = masks.shape[0], tgt.shape[0]
    cost = torch.zeros(q, n)
    prob = torch.softmax(logits, -1)
    for i in range(q):
        for j in range(n):
            x, y = masks[i].flatten(), tgt[j].flatten().float()
            bce = -(y * torch.log(torch.sigmoid(x)) + (1 - y) * torch.log(1 - torch.sigmoid(x))).mean()
            p = torch.sigmoid(x)
            dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
            cost[i, j] = -2 * prob[i, labels[j]] + 5 * bce + 5 * dice
    return cost


def test_matcher_on_a_clip_with_a_track_empty_in_one_frame() -> None:
    h = w = 4
    left = torch.zeros(h, w, dtype=torch.bool)
    left[:, :2] = True
    right = ~left
    empty = torch.zeros(h, w, dtype=torch.bool)
    labels = torch.tensor([0, 1])  # track A (class 0) in both frames; track B (class 1) only in frame 0
    tgt = torch.stack([torch.stack([left, left]), torch.stack([right, empty])])
    lo, hi = -6.0, 6.0

    def pred(m0: torch.Tensor, m1: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.where(m0, hi, lo), torch.where(m1, hi, lo)])

    masks = torch.stack([pred(right, empty), pred(left, left), pred(right, right)])  # q0, q1, q2
    logits = torch.tensor([[0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.5, 0.0]])  # q2 is surer of class 1
    coords = pixel_centres(h, w)
    cost = video_matching_cost(logits, masks, labels, tgt, coords, 2.0, 5.0, 5.0)
    assert torch.allclose(cost, dense_cost(logits, masks, labels, tgt), atol=1e-4)
    (rows, cols), = video_hungarian_match(logits[None], masks[None], [{"labels": labels, "masks": tgt}], 0,
                                          2.0, 5.0, 5.0, coords=coords)
    # B goes to q0 (empty in frame 1), not to q2 (surer class, but a mask in B's empty frame)
    assert dict(zip(cols.tolist(), rows.tolist(), strict=True)) == {0: 1, 1: 0}
    # brute force over all assignments of the dense cost
    ref = dense_cost(logits, masks, labels, tgt)
    best = min(itertools.permutations(range(3), 2), key=lambda p: float(ref[p[0], 0] + ref[p[1], 1]))
    assert (int(rows[cols == 0]), int(rows[cols == 1])) == best


def test_matcher_points_are_shared_by_the_frames() -> None:
    """With one point set for all frames, swapping the frames of predictions and targets
    alike only permutes the T*P terms: the cost is unchanged (per-frame points would change it)."""
    g = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(5, 4, generator=g), torch.randn(5, 2, 8, 8, generator=g)
    tgt = torch.rand(3, 2, 8, 8, generator=g) > 0.5
    labels = torch.tensor([0, 2, 1])
    coords = torch.rand(50, 2, generator=g)
    a = video_matching_cost(logits, masks, labels, tgt, coords, 2.0, 5.0, 5.0)
    b = video_matching_cost(logits, masks.flip(1), labels, tgt.flip(1), coords, 2.0, 5.0, 5.0)
    assert torch.allclose(a, b, atol=1e-5)
    # and the frames do count: a target flipped alone costs differently
    c = video_matching_cost(logits, masks, labels, tgt.flip(1), coords, 2.0, 5.0, 5.0)
    assert not torch.allclose(a, c, atol=1e-3)


# ----------------------------------------------------------------------------- criterion


def test_criterion_on_a_hand_built_clip(monkeypatch: pytest.MonkeyPatch) -> None:
    """One query, one track empty in frame 1, every pixel as a loss point: mask / dice are the
    per-frame dense losses summed over the T frames and divided by the number of TRACKS."""
    cfg = tiny_cfg(head="segmenter", m2f={"deep_supervision": False})
    crit = VideoMask2FormerCriterion(cfg)
    h = w = 8  # masks at 1/4 of a 32 x 32 input
    g = torch.Generator().manual_seed(1)
    masks = torch.randn(1, 1, 2, h, w, generator=g)
    logits = torch.randn(1, 1, K + 1, generator=g)
    out = VideoMask2FormerOutput(pred_logits=logits, pred_masks=masks, aux=[], ml_logits=None, topk_index=None,
                                 valid=None, image_size=(32, 32), num_classes=K, clip_len=2)
    tgt_small = torch.zeros(1, 2, h, w, dtype=torch.bool)
    tgt_small[0, 0, 2:6, 1:5] = True
    big = tgt_small.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # 1 x 2 x 32 x 32

    def centres(maps: torch.Tensor, num_points: int, *_: object, **__: object) -> torch.Tensor:
        return pixel_centres(h, w)[None].expand(maps.shape[0], -1, -1)

    monkeypatch.setattr(image_losses, "uncertain_points", centres)  # the shared per-step code samples there
    res = crit(out, [{"labels": torch.tensor([3]), "masks": big}])
    # independent: nearest-resampled target at the pred pixel centres = tgt_small
    x, y = masks[0, 0], tgt_small[0].float()
    bce = sum(F.binary_cross_entropy_with_logits(x[t], y[t]) for t in range(2))
    p = x.sigmoid()
    dice = sum(1 - (2 * (p[t] * y[t]).sum() + 1) / (p[t].sum() + y[t].sum() + 1) for t in range(2))
    weight = torch.ones(K + 1)
    weight[-1] = cfg.mask2former.no_object_weight
    ce = F.cross_entropy(logits[0], torch.tensor([3]), weight)
    assert torch.allclose(res["mask"], bce, atol=1e-5) and torch.allclose(res["dice"], dice, atol=1e-5)
    assert torch.allclose(res["ce"], ce, atol=1e-6)
    assert torch.allclose(res["loss"], 2 * ce + 5 * bce + 5 * dice, atol=1e-4)


def test_one_frame_criterion_equals_the_image_criterion() -> None:
    cfg = tiny_cfg()
    model = video_model(clip_len=1).train()
    torch.manual_seed(3)
    out = model(torch.randn(2, 3, 64, 64))
    lab = torch.randint(0, K, (2, 64, 64))
    lab[:, :40] = torch.tensor([2, 5])[:, None, None]
    torch.manual_seed(7)
    v = VideoMask2FormerCriterion(cfg)(out, [clip_targets_from_semantic(x[None], K, 255) for x in lab])
    img_out = frame_output(out)
    img_out.aux = [(lg, m[:, :, 0]) for lg, m in out.aux]
    torch.manual_seed(7)
    i = Mask2FormerCriterion(cfg)(img_out, [targets_from_semantic(x, K, 255) for x in lab])
    for key in ("loss", "ce", "mask", "dice", "ml", "kept"):
        assert torch.allclose(v[key], i[key], atol=1e-5), key


def test_ml_target_is_the_union_of_the_clip_classes() -> None:
    cfg = tiny_cfg()
    model = video_model(clip_len=2).train()
    out = model(torch.randn(4, 3, 64, 64))
    lab = torch.full((2, 2, 64, 64), 255)
    lab[0, 0] = 1
    lab[0, 1, :32], lab[0, 1, 32:] = 4, 8
    lab[1, 0], lab[1, 1] = 2, 9
    res = VideoMask2FormerCriterion(cfg)(out, [clip_targets_from_semantic(x, K, 255) for x in lab])
    y = torch.zeros(2, K)
    y[0, [1, 4, 8]] = 1
    y[1, [2, 9]] = 1
    assert out.ml_logits is not None
    assert torch.allclose(res["ml"], asymmetric_loss(out.ml_logits, y), atol=1e-6)


def test_target_shape_errors() -> None:
    model = video_model(clip_len=2).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    crit = VideoMask2FormerCriterion(tiny_cfg())
    with pytest.raises(ValueError, match="expected n x 2"):
        crit(out, [{"labels": torch.tensor([1]), "masks": torch.ones(1, 3, 64, 64, dtype=torch.bool)}])
    with pytest.raises(ValueError, match="clip output"):
        crit(frame_output(out), [{"labels": torch.tensor([1]), "masks": torch.ones(1, 64, 64, dtype=torch.bool)}] * 2)


@pytest.mark.slow  # ~10-30 s on one shared core
def test_overfits_one_tiny_clip() -> None:
    torch.manual_seed(0)
    model = video_model(clip_len=2).train()
    crit = VideoMask2FormerCriterion(tiny_cfg())
    lab = torch.full((2, 64, 64), 1, dtype=torch.long)
    lab[0, :32] = 3
    lab[1, :24] = 3  # class 3 moves between the frames
    lab[1, 40:, :20] = 7  # class 7 only in frame 2
    colours = {1: (1.0, -1.0, 0.0), 3: (-1.0, 1.0, 0.5), 7: (0.0, 0.5, -1.0)}
    img = torch.zeros(2, 3, 64, 64)
    for c, rgb in colours.items():
        for t in range(2):
            img[t, :, lab[t] == c] = torch.tensor(rgb)[:, None]
    targets = [clip_targets_from_semantic(lab, K, 255)]
    losses = overfit(model, crit, img, targets)
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    model.eval()
    with torch.no_grad():
        out = model(img)
    assert out.topk_index is not None and {1, 3, 7} <= set(out.topk_index[0].tolist())
