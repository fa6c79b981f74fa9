"""Tensors made on the host, sent to the training device without waiting for it.

Why: a blocking host-to-device copy makes CUDA wait for the stream (everything queued before
it) before it returns: a sync in the middle of a training step. Index tables and targets that
the host builds from a value it already holds need not wait; `non_blocking` queues the copy
behind the work already queued, which is the order the step needs anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor


def host_to(t: Tensor, device: torch.device) -> Tensor:
    """A tensor made on the host (indices, targets) on `device` without a blocking copy. The
    source must be one nothing writes afterwards (a fresh tensor, or a constant table): from
    pageable memory the copy is staged at once, from pinned memory it reads the source later."""
    return t.to(device, non_blocking=True)
