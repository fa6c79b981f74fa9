"""Inference helpers: scatter back to K classes, whole / sliding-window / multi-scale.

All functions take normalised images N x 3 x H x W and return full-resolution outputs at the
input size. Keyword arguments (`kappa`, `dynamic_threshold`, `select_override`, `gt_classes`)
pass through to the model's forward; a selection given per image applies to every window.
"""

from __future__ import annotations

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
    logits = out.mask_logits
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    if out.topk_index is None:
        if out.valid is None:
            return logits
        return logits.masked_fill(~out.valid[:, :, None, None], fill)
    b, _, h, w = logits.shape
    full = logits.new_full((b, num_classes + 1, h, w), fill)
    index = out.topk_index if out.valid is None else out.topk_index.masked_fill(~out.valid, num_classes)
    full.scatter_(1, index[:, :, None, None].expand(-1, -1, h, w), logits)
    return full[:, :num_classes]


def _ml_probs(out: SegOutput) -> Tensor | None:
    return out.ml_logits.sigmoid() if out.ml_logits is not None else None


@torch.no_grad()
def predict_whole(model: nn.Module, images: Tensor, num_classes: int, return_ml: bool = False,
                  **fwd_kw) -> Tensor | tuple[Tensor, Tensor | None]:
    """One forward over the whole image: N x 3 x H x W -> logits N x K x H x W.

    Sides that are not multiples of the patch size are zero-padded (bottom/right) and the
    logits cropped back. With return_ml, also the ml probabilities (N x K, or clips x K; None
    for models without an ml branch).
    """
    h, w = images.shape[-2:]
    p = getattr(model, "patch_size", 16)
    ph, pw = -h % p, -w % p
    x = F.pad(images, (0, pw, 0, ph)) if ph or pw else images
    out: SegOutput = model(x, **fwd_kw)
    logits = scatter_to_classes(out, num_classes, size=tuple(x.shape[-2:]))[..., :h, :w]
    return (logits, _ml_probs(out)) if return_ml else logits


@torch.no_grad()
def predict_slide(model: nn.Module, images: Tensor, num_classes: int, crop: int | tuple[int, int],
                  stride: int | tuple[int, int], return_ml: bool = False,
                  **fwd_kw) -> Tensor | tuple[Tensor, Tensor | None]:
    """mmseg-style sliding window: N x 3 x H x W -> logits N x K x H x W.

    Each window makes its own top-kappa selection; overlapping logits are averaged, the
    -100 of unselected classes included (as the official code). Windows are padded to the
    crop when the image is smaller. ml probabilities (return_ml) are averaged over windows.
    """
    n, _, h, w = images.shape
    (ch, cw), (sh, sw) = _pair(crop), _pair(stride)
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    logits = images.new_zeros((n, num_classes, h, w))
    count = images.new_zeros((1, 1, h, w))
    ml_sum, n_win = None, 0
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            window = images[:, :, y1:y2, x1:x2]
            wh, ww = window.shape[-2:]
            window = F.pad(window, (0, cw - ww, 0, ch - wh))
            win_logits, ml = predict_whole(model, window, num_classes, return_ml=True, **fwd_kw)
            logits[:, :, y1:y2, x1:x2] += win_logits[..., :wh, :ww]
            count[:, :, y1:y2, x1:x2] += 1
            if ml is not None:
                ml_sum = ml if ml_sum is None else ml_sum + ml
            n_win += 1
    logits = logits / count
    if return_ml:
        return logits, (ml_sum / n_win if ml_sum is not None else None)
    return logits


@torch.no_grad()
def predict_multiscale(model: nn.Module, images: Tensor, num_classes: int, scales: tuple[float, ...] = (1.0,),
                       flip: bool = False, mode: str = "whole", crop: int | tuple[int, int] | None = None,
                       stride: int | tuple[int, int] | None = None, return_ml: bool = False,
                       **fwd_kw) -> Tensor | tuple[Tensor, Tensor | None]:
    """Multi-scale (+ horizontal flip) test: average of softmax probabilities, N x K x H x W.

    Each pass resizes the image by `scale` (bilinear), predicts with `mode` ("whole" or
    "slide" with crop/stride), resizes the logits back to H x W, then softmaxes.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and (crop is None or stride is None):
        raise ValueError("slide mode needs crop and stride")
    h, w = images.shape[-2:]
    probs = images.new_zeros((images.shape[0], num_classes, h, w))
    ml_sum, passes = None, 0
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            x = scaled.flip(-1) if flipped else scaled
            if mode == "whole":
                logits, ml = predict_whole(model, x, num_classes, return_ml=True, **fwd_kw)
            else:
                logits, ml = predict_slide(model, x, num_classes, crop, stride, return_ml=True, **fwd_kw)
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            probs += logits.softmax(dim=1)
            if ml is not None:
                ml_sum = ml if ml_sum is None else ml_sum + ml
            passes += 1
    probs /= passes
    if return_ml:
        return probs, (ml_sum / passes if ml_sum is not None else None)
    return probs
