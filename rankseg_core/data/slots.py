"""Training batches handed from DataLoader workers to the training process through fixed
shared-memory slots.

Why: torch sends every batch a worker makes as fresh shared memory: the worker creates a
shared-memory file, faults its pages in, and passes its descriptor over a socket to the main
process, which maps it and later unmaps it. That cost about 0.13 ms of CPU per 128 px sample
(more than the sample's resize) and 0.9 ms per 512 px sample, a third of it in the training
process (docs/benchmarks.md "Training loader"; through the slots: 0.04 and 0.24 ms). Here the
memory is made once, before the workers start, and split into `per_worker` slots per worker; a
worker writes its batch into a free slot of its own and sends only the slot's number and the
tensors' places in it (`SlotBatch`, a few hundred bytes). The training process makes the
tensors as views of the slot, and the slot is free again when the last of them is gone
(`weakref.finalize` on the slot's array, which every view keeps alive), so a batch the training
loop still holds is never written over. A worker that finds none of its slots free, or a batch larger than a slot,
falls back to torch's path (data/loading.py `_cat_all`): slower, never wrong. (A batch the
DataLoader drops unseen, e.g. when a persistent-workers loader is iterated again, keeps its slot
for the pool's lifetime; training iterates its endless stream once.)

Ownership of a slot's busy flag: only its worker sets it (before writing), only the training
process clears it (after the batch's last tensor is freed), so no lock is needed.
"""

from __future__ import annotations

import math
import os
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Byte alignment of each tensor inside a batch's memory (a cache line; any dtype's size divides it).
ALIGN = 64

# The pools of this process by key: a `SlotBatch` arriving from a worker names its pool, and
# pickling the pool itself with it would send the whole shared memory again.
_POOLS: "weakref.WeakValueDictionary[str, BatchSlots]" = weakref.WeakValueDictionary()


def layout(groups: dict[str, list[Tensor]]) -> tuple[dict[str, tuple[int, tuple[int, ...]]], int]:
    """Where each key's concatenation (along dim 0) goes in one block: key -> (byte offset,
    shape), offsets aligned to ALIGN, and the block's size in bytes."""
    spans, end = {}, 0
    for k, parts in groups.items():
        shape = (sum(int(p.shape[0]) for p in parts), *parts[0].shape[1:])
        start = -(-end // ALIGN) * ALIGN
        end = start + parts[0].element_size() * math.prod(shape)
        spans[k] = (start, tuple(int(s) for s in shape))
    return spans, end


def cat_into(block: Tensor, groups: dict[str, list[Tensor]], spans: dict[str, tuple[int, tuple[int, ...]]]
             ) -> dict[str, Tensor]:
    """Each key's tensors concatenated into its span of `block` (1-D uint8): views of it."""
    out = {}
    for k, parts in groups.items():
        start, shape = spans[k]
        nbytes = parts[0].element_size() * math.prod(shape)
        out[k] = torch.cat(parts, out=block[start:start + nbytes].view(parts[0].dtype).view(shape))
    return out


@dataclass
class SlotBatch:
    """A batch a worker wrote into slot `slot` of pool `pool`: key -> (byte offset, dtype,
    shape) of its tensors there, and the batch's other entries (lists), sent as they are."""

    pool: str
    slot: int
    spans: dict[str, tuple[int, str, tuple[int, ...]]]
    rest: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, Any]:
        """The batch in the training process: its tensors as views of the slot (which stays
        taken until the last of them is freed), then the other entries."""
        pool = _POOLS.get(self.pool)
        if pool is None:
            raise RuntimeError("a batch arrived for a loader whose shared memory is gone in this process")
        owner = pool.array[self.slot]  # a new array object per batch: its death frees the slot
        weakref.finalize(owner, pool.release, self.slot)
        base = torch.from_numpy(owner)
        out: dict[str, Any] = {}
        for k, (start, dtype, shape) in self.spans.items():
            dt = getattr(torch, dtype)
            out[k] = base[start:start + dt.itemsize * math.prod(shape)].view(dt).view(shape)
        out.update(self.rest)
        return out

    def pin_memory(self) -> dict[str, Any]:
        """The DataLoader's pin-memory thread calls this: the batch copied into page-locked
        memory (the slot is free again at once), so the copy to the GPU can run asynchronously."""
        return _pin(self.tensors())


def _pin(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.pin_memory()
    if isinstance(x, dict):
        return {k: _pin(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_pin(v) for v in x]
    return x


class BatchSlots:
    """`per_worker` slots of `capacity` bytes for each of `workers` DataLoader workers, in
    shared memory made by the training process before the workers start (a fork inherits it;
    a spawned worker receives it once with the collate function)."""

    def __init__(self, workers: int, per_worker: int, capacity: int) -> None:
        self.per_worker, self.capacity = per_worker, -(-capacity // ALIGN) * ALIGN
        n = workers * per_worker
        self.data = torch.empty((n, self.capacity), dtype=torch.uint8).share_memory_()
        self.busy = torch.zeros(n, dtype=torch.uint8).share_memory_()
        self.key = uuid.uuid4().hex
        self._register()

    def _register(self) -> None:
        self.array, self._flags = self.data.numpy(), self.busy.numpy()
        _POOLS[self.key] = self

    def __getstate__(self) -> dict[str, Any]:  # spawned workers: the tensors travel, the views are made again
        return {k: v for k, v in self.__dict__.items() if k not in ("array", "_flags")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._register()

    def release(self, slot: int) -> None:
        self._flags[slot] = 0

    def write(self, worker: int, groups: dict[str, list[Tensor]], rest: dict[str, Any]) -> SlotBatch | None:
        """In worker `worker`: the concatenated groups written into a free slot of its own, or
        None (no slot free, or the batch does not fit: the caller sends it torch's way)."""
        spans, end = layout(groups)
        if end > self.capacity:
            return None
        first = worker * self.per_worker
        free = np.flatnonzero(self._flags[first:first + self.per_worker] == 0)
        if free.size == 0:
            return None
        slot = first + int(free[0])
        self._flags[slot] = 1
        try:
            cat_into(self.data[slot], groups, spans)
        except BaseException:
            self._flags[slot] = 0
            raise
        return SlotBatch(self.key, slot, {k: (start, str(groups[k][0].dtype).removeprefix("torch."), shape)
                                          for k, (start, shape) in spans.items()}, rest)


def shared_memory_free() -> int | None:
    """Free bytes of /dev/shm (where torch's shared memory lives on Linux), or None if unknown."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def make_slots(workers: int, per_worker: int, capacity: int) -> BatchSlots | None:
    """A pool for `workers` workers, with fewer slots (or none: None) where /dev/shm is small
    (a container's default 64 MB): the pool may take at most half of what is free there, since
    touching shared memory beyond the limit kills the process with SIGBUS."""
    if workers < 1 or capacity < 1:
        return None
    free = shared_memory_free()
    if free is not None:
        per_worker = min(per_worker, free // 2 // (workers * capacity))
    if per_worker < 1:
        return None
    try:
        return BatchSlots(workers, per_worker, capacity)
    except (RuntimeError, OSError):  # no shared memory to be had now: torch's path says so if it fails too
        return None
