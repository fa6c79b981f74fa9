"""Inference: whole image, sliding window, multi-scale + flip, as the official mmseg code.

The official protocol (mmseg 0.x `EncoderDecoder` in the RankSeg fork), for each test pass
(one scale, flipped or not) of an image already resized for testing:
  1. `encode_decode(x)`: the ViT's PatchEmbed zero-pads x bottom/right to a multiple of 16,
     the head returns logits on that (ceil) patch grid with -100 for unselected classes, and
     they are resized bilinearly to x's UNPADDED size (the padded grid is stretched over it).
  2. slide: windows of `crop` every `stride`, the last one flush with the border; a side
     shorter than the crop gives a window of that side, decoded unpadded (only step 1's
     padding to 16). Overlapping logits are averaged, -100 entries included.
  3. The pass's logits are resized to the ORIGINAL image size, softmaxed over K, un-flipped;
     scales x flips average these probabilities. The prediction is their argmax.
All functions take normalised images N x 3 x H x W.

The work is done on `ClassMaps`: per image, maps over only the classes it selected in some
window or pass (about kappa of them), never over all K. At K = 1,284 a dense K x H x W float
map of a 512 x 683 image is 1.8 GB; the compact one is kappa/K of that. A class an image never
selected holds the official -100 everywhere; after the softmax it is < 1e-40 next to any
selected class, so dropping it changes no probability beyond float rounding and never the
argmax (tested against a dense K-channel re-implementation, `tests/test_protocol.py`). The
`predict_*` functions return dense K-channel tensors (`to_dense`) for callers that want them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.config.train import EvalConfig
from rankseg_core.data.augment import rescale_size
from rankseg_core.model.heads import FILL_LOGIT, SegOutput
from rankseg_core.model.selection import NO_SELECTION, Selection


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """mmseg's `resize`: bilinear, align_corners=False (a no-op at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """Size of an h x w image at `scale`, rounded half up as mmcv (never below 1 px)."""
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


@dataclass
class ClassMaps:
    """Per-pixel maps over a subset of the K classes: channel c of `maps` is class `classes[c]`.

    maps: N x C x H x W; classes: C sorted long class ids (for the baseline, all K).
    """

    maps: Tensor
    classes: Tensor

    def widen(self, classes: Tensor, missing: Tensor | float) -> Tensor:
        """N x len(classes) x H x W over the sorted superset `classes`; new channels = `missing`
        (a scalar, or an N x 1 x H x W / 1 x 1 x H x W map)."""
        if torch.equal(classes, self.classes):
            return self.maps
        n, _, h, w = self.maps.shape
        out = self.maps.new_empty((n, classes.numel(), h, w))
        out[:] = missing
        out[:, torch.searchsorted(classes, self.classes)] = self.maps
        return out

    def to_dense(self, num_classes: int, fill: float) -> Tensor:
        """N x K x H x W, classes outside `classes` = `fill`."""
        return self.widen(torch.arange(num_classes, device=self.classes.device), fill)

    def argmax(self) -> Tensor:
        """N x H x W class ids of the highest map."""
        return self.classes[self.maps.argmax(1)]


def _union(a: Tensor, b: Tensor) -> Tensor:
    return torch.unique(torch.cat([a, b]))  # sorted


def _ml_probs(out: SegOutput) -> Tensor | None:
    return out.ml_logits.float().sigmoid() if out.ml_logits is not None else None


def compact_logits(out: SegOutput, num_classes: int, size: tuple[int, int] | None = None,
                   fill: float = FILL_LOGIT) -> ClassMaps:
    """A forward's logits over the union of the batch's selected classes (float32).

    Equals `scatter_to_classes(out, num_classes, fill, size)` restricted to those classes: an
    image's unselected classes in the union (selected for another image) get `fill`. The C
    selected channels are resized before the scatter, which equals resizing the K channels
    (constant channels stay constant) at C/K of the cost.
    """
    logits = out.mask_logits.float()
    if size is not None:
        logits = _resize(logits, size)
    if out.topk_index is None:
        classes = torch.arange(num_classes, device=logits.device)
        if out.valid is not None:
            logits = logits.masked_fill(~out.valid[:, :, None, None], fill)
        return ClassMaps(logits, classes)
    index = out.topk_index if out.valid is None else out.topk_index.masked_fill(~out.valid, num_classes)
    classes = torch.unique(index)
    classes = classes[classes < num_classes]
    b, _, h, w = logits.shape
    # The last channel collects the padding columns and is dropped.
    full = logits.new_full((b, classes.numel() + 1, h, w), fill)
    slot = torch.where(index < num_classes, torch.searchsorted(classes, index.clamp(max=num_classes - 1)),
                       classes.numel())
    full.scatter_(1, slot[:, :, None, None].expand(-1, -1, h, w), logits)
    return ClassMaps(full[:, :-1], classes)


def scatter_to_classes(out: SegOutput, num_classes: int, fill: float = FILL_LOGIT,
                       size: tuple[int, int] | None = None) -> Tensor:
    """Selected-channel logits -> B x K x h x w, unselected classes = `fill` (official -100).

    With `size`, the logits are resized (bilinear, align_corners=False) to it. Padding
    channels (valid False) are not scattered.
    """
    return compact_logits(out, num_classes, size, fill).to_dense(num_classes, fill)


def _image(out: SegOutput, i: int) -> SegOutput:
    """Image i of a batch output (its pixel logits and selection only)."""
    def pick(t):
        return (None if t is None else t[i:i + 1])
    return SegOutput(mask_logits=out.mask_logits[i:i + 1], topk_index=pick(out.topk_index), valid=pick(out.valid))


def _encode_decode(model: nn.Module, images: Tensor, num_classes: int, selection: Selection = NO_SELECTION,
                   patch: int = 16) -> tuple[list[ClassMaps], Tensor | None]:
    """Step 1 above: per image, logits over its own selected classes at the input size."""
    h, w = images.shape[-2:]
    x = F.pad(images, (0, -w % patch, 0, -h % patch))
    out: SegOutput = model(x, selection)
    return [compact_logits(_image(out, i), num_classes, size=(h, w)) for i in range(len(images))], _ml_probs(out)


def _slide(model: nn.Module, images: Tensor, num_classes: int, crop: int | tuple[int, int],
           stride: int | tuple[int, int], selection: Selection = NO_SELECTION, patch: int = 16
           ) -> tuple[list[ClassMaps], Tensor | None]:
    """Step 2 above: per image, window-averaged logits at the input size."""
    n, _, h, w = images.shape
    (ch, cw), (sh, sw) = _pair(crop), _pair(stride)
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    empty = torch.zeros(0, dtype=torch.long, device=images.device)
    sums = [ClassMaps(images.new_zeros((1, 0, h, w)), empty) for _ in range(n)]
    count = images.new_zeros((1, 1, h, w))
    ml_sum, n_win = None, 0
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            windows, ml = _encode_decode(model, images[:, :, y1:y2, x1:x2], num_classes, selection, patch)
            for i, win in enumerate(windows):
                classes = _union(sums[i].classes, win.classes)
                # A class new to this image was unselected, i.e. -100, in every window so far.
                summed = sums[i].widen(classes, count * FILL_LOGIT)
                summed[:, :, y1:y2, x1:x2] += win.widen(classes, FILL_LOGIT)
                sums[i] = ClassMaps(summed, classes)
            count[:, :, y1:y2, x1:x2] += 1
            if ml is not None:
                ml_sum = ml if ml_sum is None else ml_sum + ml
            n_win += 1
    return [ClassMaps(s.maps / count, s.classes) for s in sums], (ml_sum / n_win if ml_sum is not None else None)


def _logits(model: nn.Module, images: Tensor, num_classes: int, mode: str, crop: int | tuple[int, int] | None,
            stride: int | tuple[int, int] | None, selection: Selection = NO_SELECTION, patch: int = 16
            ) -> tuple[list[ClassMaps], Tensor | None]:
    if mode == "whole":
        return _encode_decode(model, images, num_classes, selection, patch)
    if mode == "slide":
        if crop is None or stride is None:
            raise ValueError("slide mode needs crop and stride")
        return _slide(model, images, num_classes, crop, stride, selection, patch)
    raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")


def _add(total: ClassMaps | None, probs: ClassMaps) -> ClassMaps:
    """Sum of probability maps; a class a pass did not select has probability 0 there."""
    if total is None:
        return probs
    classes = _union(total.classes, probs.classes)
    summed = total.widen(classes, 0.0)
    summed += probs.widen(classes, 0.0)
    return ClassMaps(summed, classes)


@torch.no_grad()
def predict_probs(model: nn.Module, images: Tensor, num_classes: int, sizes: list[tuple[int, int]] | None = None,
                  scales: tuple[float, ...] = (1.0,), flip: bool = False, mode: str = "whole",
                  crop: int | tuple[int, int] | None = None, stride: int | tuple[int, int] | None = None,
                  scale_sizes: list[tuple[int, int]] | None = None,
                  selection: Selection = NO_SELECTION, patch: int = 16) -> tuple[list[ClassMaps], Tensor | None]:
    """Mean softmax probabilities per image, over the classes it selected (step 3 above).

    images N x 3 x H x W -> ([ClassMaps 1 x C_i x h_i x w_i at sizes[i] (default H x W)],
    ml probabilities N x K (clips x K for video) averaged over windows and passes, or None).
    Each pass resizes the images to `scale_sizes[j]` (default: `scaled_size(H, W, scales[j])`,
    bilinear), flips them if asked, predicts with `mode` ("whole", or "slide" with crop /
    stride) under `selection`, zero-padding inputs to a multiple of `patch`, resizes the logits
    to sizes[i], softmaxes and un-flips.
    """
    n, _, h, w = images.shape
    # tuple(): callers may pass [h, w] lists (e.g. read from JSON).
    sizes = [cast(tuple[int, int], tuple(s)) for s in sizes] if sizes is not None else [(h, w)] * n
    totals: list[ClassMaps | None] = [None] * n
    ml_sum, passes = None, 0
    for j, scale in enumerate(scales):
        size = cast(tuple[int, int], tuple(scale_sizes[j])) if scale_sizes is not None else scaled_size(h, w, scale)
        scaled = _resize(images, size)
        for flipped in ((False, True) if flip else (False,)):
            maps, ml = _logits(model, scaled.flip(-1) if flipped else scaled, num_classes, mode, crop, stride,
                               selection, patch)
            for i, m in enumerate(maps):
                probs = _resize(m.maps, sizes[i]).softmax(dim=1)
                totals[i] = _add(totals[i], ClassMaps(probs.flip(-1) if flipped else probs, m.classes))
            if ml is not None:
                ml_sum = ml if ml_sum is None else ml_sum + ml
            passes += 1
    filled = cast(list[ClassMaps], totals)  # every pass filled every image
    return [ClassMaps(t.maps / passes, t.classes) for t in filled], (ml_sum / passes if ml_sum is not None else None)


def _dense(maps: list[ClassMaps], num_classes: int, fill: float) -> Tensor:
    return torch.cat([m.to_dense(num_classes, fill) for m in maps])


@torch.no_grad()
def predict_whole(model: nn.Module, images: Tensor, num_classes: int, return_ml: bool = False,
                  selection: Selection = NO_SELECTION, patch: int = 16) -> Tensor | tuple[Tensor, Tensor | None]:
    """mmseg's `encode_decode`: N x 3 x H x W -> logits N x K x H x W (unselected -100).

    Sides that are not multiples of the patch size are zero-padded (bottom/right) for the
    forward, and the patch-grid logits are resized to H x W. With return_ml, also the ml
    probabilities (N x K, or clips x K; None for models without an ml branch).
    """
    maps, ml = _encode_decode(model, images, num_classes, selection, patch)
    logits = _dense(maps, num_classes, FILL_LOGIT)
    return (logits, ml) if return_ml else logits


@torch.no_grad()
def predict_slide(model: nn.Module, images: Tensor, num_classes: int, crop: int | tuple[int, int],
                  stride: int | tuple[int, int], return_ml: bool = False,
                  selection: Selection = NO_SELECTION, patch: int = 16) -> Tensor | tuple[Tensor, Tensor | None]:
    """mmseg's sliding window: N x 3 x H x W -> logits N x K x H x W.

    Each window makes its own top-kappa selection; overlapping logits are averaged, the
    -100 of unselected classes included. A window smaller than the crop (image side below
    it) is decoded unpadded. ml probabilities (return_ml) are averaged over windows.
    """
    maps, ml = _slide(model, images, num_classes, crop, stride, selection, patch)
    logits = _dense(maps, num_classes, FILL_LOGIT)
    return (logits, ml) if return_ml else logits


@torch.no_grad()
def predict_multiscale(model: nn.Module, images: Tensor, num_classes: int, scales: tuple[float, ...] = (1.0,),
                       flip: bool = False, mode: str = "whole", crop: int | tuple[int, int] | None = None,
                       stride: int | tuple[int, int] | None = None, size: tuple[int, int] | None = None,
                       return_ml: bool = False, selection: Selection = NO_SELECTION, patch: int = 16
                       ) -> Tensor | tuple[Tensor, Tensor | None]:
    """`predict_probs` as dense probabilities N x K x h x w at `size` (default the input
    size); classes an image never selected get 0."""
    sizes = [size] * len(images) if size is not None else None
    maps, ml = predict_probs(model, images, num_classes, sizes, scales, flip, mode, crop, stride,
                             selection=selection, patch=patch)
    probs = _dense(maps, num_classes, 0.0)
    return (probs, ml) if return_ml else probs


def mmseg_scale_sizes(e: EvalConfig, images: Tensor, sizes: list[tuple[int, int]], scales: list[float]
                ) -> list[tuple[int, int]] | None:
    """The image size of each test scale, as mmseg's MultiScaleFlipAug computes it: the
    ORIGINAL image (sizes[0]) keep-ratio resized to (max_long x r, short_side x r).

    None (= scale the input size, `inference.scaled_size`) when the batch's images differ in
    original size or were not resized by the test transform (scale 1 must give the input size).
    """
    h, w = images.shape[-2:]
    if len(set(map(tuple, sizes))) != 1 or not e.short_side or not e.max_long:
        return None
    oh, ow = sizes[0]
    if rescale_size(oh, ow, e.max_long, e.short_side) != (h, w):
        return None
    return [rescale_size(oh, ow, int(e.max_long * r), int(e.short_side * r)) for r in scales]
