"""A training batch from the loader's compact form to what the model and the losses take.

The loader's workers ship uint8 images and uint16 label / segment maps (data/loading.py
`AugmentedClips`): a quarter of the bytes of float32 / int64 through the workers' shared
memory and the host-to-device copy. Normalisation, the zero padding and the int64 labels are
made here, on the device the model runs on, after one non_blocking copy per tensor (really
asynchronous when the loader pins its batches: `make_loader(pin_memory=True)`).

The values are those of the numpy chain (data/augment.py `normalize_padded`) bit for bit:
uint8 -> float32 is exact, and `(x - mean) / std` is one correctly rounded float32 subtraction
and one correctly rounded float32 division on every device (a tensor divisor, never turned
into a multiplication by a reciprocal); the padding is written as +0.0 with `masked_fill`
(multiplying by a 0 / 1 mask would leave -0.0 where the normalised value was negative).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

# Keys whose maps become int64 on the device (the dtype the losses index with).
_INDEX_MAPS = ("label", "segments")


@lru_cache(maxsize=8)
def _mean_std(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """1 x 3 x 1 x 1 float32 mean and std on `device`, made once: building them per batch
    would be a small blocking copy every step."""
    def on(v: tuple[float, ...]) -> Tensor:
        return torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).to(device)

    return on(mean), on(std)


def padding_mask(extent: Tensor, size: tuple[int, int]) -> Tensor:
    """N x 2 (h, w) extents of the real pixels (top left of each crop) -> N x H x W bool,
    True in the padding (rows >= h or columns >= w), on extent's device."""
    rows = torch.arange(size[0], device=extent.device)
    cols = torch.arange(size[1], device=extent.device)
    return (rows[None, :, None] >= extent[:, 0, None, None]) | (cols[None, None, :] >= extent[:, 1, None, None])


def normalize_images(image: Tensor, extent: Tensor | None, mean: Tensor, std: Tensor) -> Tensor:
    """N x 3 x H x W uint8 -> N x 3 x H x W float32: (x - mean) / std, +0.0 in the padding
    given by extent (N x 2, or None: no padding). mean / std: 1 x 3 x 1 x 1 float32."""
    out = image.to(torch.float32).sub_(mean).div_(std)  # one float allocation, ops in place
    if extent is not None:
        out.masked_fill_(padding_mask(extent, (out.shape[-2], out.shape[-1]))[:, None], 0.0)
    return out


def to_device(batch: dict[str, Any], device: torch.device, mean: list[float], std: list[float]) -> dict[str, Any]:
    """A loader batch (`collate_clips`) -> the batch the model and the criterion take, on `device`.

    image N x 3 x c x c uint8 -> float32 normalised with mean / std (0..255 scale), padding
    0 (where `extent`, N x 2, says); label / segments N x c x c uint16 -> int64 (65535 stays
    the ignore value); `extent` is consumed; every other tensor is copied as it is, and lists
    (segment records, instances) are passed through. A batch whose image is already float is
    only moved (and its index maps made int64)."""
    out = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
    extent = out.pop("extent", None)
    if out["image"].dtype == torch.uint8:
        m, s = _mean_std(torch.device(device), tuple(float(x) for x in mean), tuple(float(x) for x in std))
        out["image"] = normalize_images(out["image"], extent, m, s)
    for k in _INDEX_MAPS:
        if k in out and out[k].dtype != torch.int64:
            out[k] = out[k].to(torch.int64)
    return out
