"""Inference helpers: scatter back to K classes, whole / sliding-window / multi-scale.

All functions take normalised images N x 3 x H x W and return full-resolution outputs at the
input size. Keyword arguments (`kappa`, `dynamic_threshold`, `select_override`, `gt_classes`)
pass through to the model's forward; a selection given per image applies to every window.

The work is done on `ClassMaps`: maps over only the classes some pass or window selected
(their union, about kappa of them), never over all K. At K = 1,284 a dense K x H x W float
map of a 512 x 683 image is 1.8 GB; the compact one is kappa/K of that. Classes outside the
union would carry the official -100 fill everywhere; after softmax that is < 1e-40, so
dropping them changes no probability beyond float rounding and never the argmax. The
`predict_*` functions return dense K-channel tensors (`to_dense`) for callers that want them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.model.heads import FILL_LOGIT, SegOutput


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def scatter_to_classes(out: SegOutput, num_classes: int, fill: float = FILL_LOGIT,
                       size: tuple[int, int] | None = None) -> Tensor:
    """Selected-channel logits -> B x K x h x w, unselected classes = `fill` (official -100).

    With `size`, the C selected channels are upsampled (bilinear, align_corners=False) before
    the scatter, which equals upsampling the K-channel tensor (constant channels stay constant)
    at C/K of the cost. Padding channels (valid False) are not scattered.
    """
    return compact_logits(out, num_classes, size, fill).to_dense(num_classes, fill)


def _ml_probs(out: SegOutput) -> Tensor | None:
    return out.ml_logits.sigmoid() if out.ml_logits is not None else None


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


def compact_logits(out: SegOutput, num_classes: int, size: tuple[int, int] | None = None,
                   fill: float = FILL_LOGIT) -> ClassMaps:
    """A forward's logits over the union of the batch's selected classes.

    Equals `scatter_to_classes(out, num_classes, fill, size)` restricted to those classes: an
    image's unselected classes in the union (selected for another image) get `fill`.
    """
    logits = out.mask_logits
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
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


def _whole(model: nn.Module, images: Tensor, num_classes: int, **fwd_kw) -> tuple[ClassMaps, Tensor | None]:
    h, w = images.shape[-2:]
    p = getattr(model, "patch_size", 16)
    ph, pw = -h % p, -w % p
    x = F.pad(images, (0, pw, 0, ph)) if ph or pw else images
    out: SegOutput = model(x, **fwd_kw)
    maps = compact_logits(out, num_classes, size=tuple(x.shape[-2:]))
    return ClassMaps(maps.maps[..., :h, :w], maps.classes), _ml_probs(out)


def _slide(model: nn.Module, images: Tensor, num_classes: int, crop: int | tuple[int, int],
           stride: int | tuple[int, int], **fwd_kw) -> tuple[ClassMaps, Tensor | None]:
    n, _, h, w = images.shape
    (ch, cw), (sh, sw) = _pair(crop), _pair(stride)
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    total = ClassMaps(images.new_zeros((n, 0, h, w)), torch.zeros(0, dtype=torch.long, device=images.device))
    count = images.new_zeros((1, 1, h, w))
    ml_sum, n_win = None, 0
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            window = images[:, :, y1:y2, x1:x2]
            wh, ww = window.shape[-2:]
            window = F.pad(window, (0, cw - ww, 0, ch - wh))
            win, ml = _whole(model, window, num_classes, **fwd_kw)
            classes = _union(total.classes, win.classes)
            # A class new to the union was unselected, i.e. -100, in every window so far.
            summed = total.widen(classes, count * FILL_LOGIT)
            summed[:, :, y1:y2, x1:x2] += ClassMaps(win.maps[..., :wh, :ww], win.classes).widen(classes, FILL_LOGIT)
            total = ClassMaps(summed, classes)
            count[:, :, y1:y2, x1:x2] += 1
            if ml is not None:
                ml_sum = ml if ml_sum is None else ml_sum + ml
            n_win += 1
    return ClassMaps(total.maps / count, total.classes), (ml_sum / n_win if ml_sum is not None else None)


@torch.no_grad()
def predict_whole(model: nn.Module, images: Tensor, num_classes: int, return_ml: bool = False,
                  **fwd_kw) -> Tensor | tuple[Tensor, Tensor | None]:
    """One forward over the whole image: N x 3 x H x W -> logits N x K x H x W.

    Sides that are not multiples of the patch size are zero-padded (bottom/right) and the
    logits cropped back. With return_ml, also the ml probabilities (N x K, or clips x K; None
    for models without an ml branch).
    """
    maps, ml = _whole(model, images, num_classes, **fwd_kw)
    logits = maps.to_dense(num_classes, FILL_LOGIT)
    return (logits, ml) if return_ml else logits


@torch.no_grad()
def predict_slide(model: nn.Module, images: Tensor, num_classes: int, crop: int | tuple[int, int],
                  stride: int | tuple[int, int], return_ml: bool = False,
                  **fwd_kw) -> Tensor | tuple[Tensor, Tensor | None]:
    """mmseg-style sliding window: N x 3 x H x W -> logits N x K x H x W.

    Each window makes its own top-kappa selection; overlapping logits are averaged, the
    -100 of unselected classes included (as the official code). Windows are padded to the
    crop when the image is smaller. ml probabilities (return_ml) are averaged over windows.
    """
    maps, ml = _slide(model, images, num_classes, crop, stride, **fwd_kw)
    logits = maps.to_dense(num_classes, FILL_LOGIT)
    return (logits, ml) if return_ml else logits


@torch.no_grad()
def predict_compact(model: nn.Module, images: Tensor, num_classes: int, scales: tuple[float, ...] = (1.0,),
                    flip: bool = False, mode: str = "whole", crop: int | tuple[int, int] | None = None,
                    stride: int | tuple[int, int] | None = None, **fwd_kw) -> tuple[ClassMaps, Tensor | None]:
    """Multi-scale (+ horizontal flip) test over the selected classes only.

    N x 3 x H x W -> (mean softmax probabilities as ClassMaps N x C x H x W, ml probabilities
    N x K or None). Each pass resizes the image by `scale` (bilinear), predicts with `mode`
    ("whole", or "slide" with crop/stride), resizes the logits back to H x W, then softmaxes.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and (crop is None or stride is None):
        raise ValueError("slide mode needs crop and stride")
    h, w = images.shape[-2:]
    total = ClassMaps(images.new_zeros((images.shape[0], 0, h, w)),
                      torch.zeros(0, dtype=torch.long, device=images.device))
    ml_sum, passes = None, 0
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            x = scaled.flip(-1) if flipped else scaled
            if mode == "whole":
                maps, ml = _whole(model, x, num_classes, **fwd_kw)
            else:
                maps, ml = _slide(model, x, num_classes, crop, stride, **fwd_kw)
            logits = maps.maps.flip(-1) if flipped else maps.maps
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            classes = _union(total.classes, maps.classes)
            # Probability 0 for classes a pass did not select (exp(-100) below float32 resolution).
            summed = total.widen(classes, 0.0)
            summed += ClassMaps(logits.softmax(dim=1), maps.classes).widen(classes, 0.0)
            total = ClassMaps(summed, classes)
            if ml is not None:
                ml_sum = ml if ml_sum is None else ml_sum + ml
            passes += 1
    return ClassMaps(total.maps / passes, total.classes), (ml_sum / passes if ml_sum is not None else None)


@torch.no_grad()
def predict_multiscale(model: nn.Module, images: Tensor, num_classes: int, scales: tuple[float, ...] = (1.0,),
                       flip: bool = False, mode: str = "whole", crop: int | tuple[int, int] | None = None,
                       stride: int | tuple[int, int] | None = None, return_ml: bool = False,
                       **fwd_kw) -> Tensor | tuple[Tensor, Tensor | None]:
    """`predict_compact` as dense probabilities N x K x H x W (unselected classes 0)."""
    maps, ml = predict_compact(model, images, num_classes, scales, flip, mode, crop, stride, **fwd_kw)
    probs = maps.to_dense(num_classes, 0.0)
    return (probs, ml) if return_ml else probs
