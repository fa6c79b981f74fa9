"""Training batches through fixed shared-memory slots (data/slots.py): the same values as the
in-process concatenation, a slot never written over while a tensor of its batch lives, and
torch's path whenever no slot is free or the batch does not fit."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_synthetic

from rankseg_core.config.train import TrainConfig
from rankseg_core.data.loading import batch_bytes, collate_clips, make_loader
from rankseg_core.data.slots import ALIGN, BatchSlots, SlotBatch, make_slots
from rankseg_core.utils import distributed as D

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def items(n: int, seed: int, crop: int = 6) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": torch.from_numpy(rng.integers(0, 256, (1, 3, crop, crop), dtype=np.uint8)),
             "label": torch.from_numpy(rng.integers(0, 9, (1, crop, crop)).astype(np.uint16)),
             "extent": torch.tensor([[crop, 4 + i]], dtype=torch.int32),
             "pad": torch.from_numpy(rng.random((1, crop, crop)) < 0.5),
             "image_labels": torch.from_numpy(rng.random((1, 5)).astype(np.float32)),
             "segments_info": [[{"id": i}]]} for i in range(n)]


def write(slots: BatchSlots, worker: int, batch: list[dict]) -> SlotBatch | None:
    keys = [k for k in batch[0] if isinstance(batch[0][k], torch.Tensor)]
    return slots.write(worker, {k: [i[k] for i in batch] for k in keys},
                       {"segments_info": [x for i in batch for x in i["segments_info"]]})


def test_a_slot_batch_has_the_values_of_torch_cat_and_frees_its_slot_with_its_last_tensor() -> None:
    slots = BatchSlots(workers=2, per_worker=2, capacity=4096)
    batch = items(3, 0)
    sent = write(slots, 1, batch)
    assert sent is not None and sent.slot == 2  # worker 1's first slot
    got, want = sent.tensors(), collate_clips(batch)
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v)
            assert got[k].data_ptr() % ALIGN == 0  # aligned spans inside the slot
            start = slots.data[sent.slot].data_ptr()
            assert start <= got[k].data_ptr() < start + slots.capacity  # a view of the slot, no copy
        else:
            assert got[k] == v
    assert list(slots.busy) == [0, 0, 1, 0]
    keep = got["label"][1:]  # a view of a view keeps the slot taken
    del got
    gc.collect()
    assert list(slots.busy) == [0, 0, 1, 0]
    # While it is taken the worker writes its next batches elsewhere, then runs out.
    other = write(slots, 1, items(3, 1))
    assert other is not None and other.slot == 3
    assert write(slots, 1, items(3, 2)) is None  # both of worker 1's slots taken: torch's path
    assert torch.equal(keep, want["label"][1:])  # never written over
    del keep
    gc.collect()
    assert list(slots.busy) == [0, 0, 0, 1]
    assert write(slots, 1, items(3, 3)) is not None  # the freed slot is used again


def test_what_a_worker_sends_is_small_and_names_its_pool() -> None:
    """The point of the slots: the message is a few hundred bytes, not the batch (and not
    the pool: pickling that would send the whole shared memory)."""
    import pickle

    slots = BatchSlots(workers=1, per_worker=1, capacity=1 << 20)
    sent = write(slots, 0, items(8, 0, crop=64))
    assert sent is not None and len(pickle.dumps(sent)) < 1000
    back = pickle.loads(pickle.dumps(sent))
    assert torch.equal(back.tensors()["image"], collate_clips(items(8, 0, crop=64))["image"])


def test_a_batch_larger_than_a_slot_goes_torchs_way() -> None:
    slots = BatchSlots(workers=1, per_worker=1, capacity=64)
    assert write(slots, 0, items(3, 0)) is None and list(slots.busy) == [0]


def test_slots_shrink_to_what_dev_shm_can_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    import rankseg_core.data.slots as S

    monkeypatch.setattr(S, "shared_memory_free", lambda: 10 * 4096)
    pool = make_slots(workers=2, per_worker=6, capacity=1000)  # 1024 after alignment: 20 fit in half of it
    assert pool is not None and pool.per_worker == 6
    pool = make_slots(workers=2, per_worker=6, capacity=4096)  # half of the free space holds 5 slots
    assert pool is not None and pool.per_worker == 2
    assert make_slots(workers=2, per_worker=6, capacity=40960) is None  # not one slot each: torch's path
    assert make_slots(workers=0, per_worker=6, capacity=4096) is None  # in-process loading needs none

    def no_shm(*args: object) -> None:
        raise RuntimeError("unable to open shared memory object")

    monkeypatch.setattr(S, "shared_memory_free", lambda: None)
    monkeypatch.setattr(S.BatchSlots, "__init__", no_shm)
    assert make_slots(workers=2, per_worker=6, capacity=4096) is None  # then torch's path


def loader_cfg(root: Path, workers: int, novel: list[int] | None = None) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.root, cfg.data.num_workers, cfg.data.novel_classes = str(root), workers, novel
    cfg.model.img_size, cfg.model.num_classes = 40, 40
    cfg.aug.scale, cfg.aug.mean, cfg.aug.std = [96, 32], MEAN, STD
    cfg.schedule.batch_size = 3
    cfg.seed = 5
    return cfg


@pytest.mark.parametrize("kind", ["semantic", "panoptic", "weak-shot"])
def test_batch_bytes_is_the_layout_of_a_real_batch(tmp_path: Path, kind: str) -> None:
    """The slot size computed from the configuration is exactly what a batch takes: a key
    added to the samples without it would send every batch torch's way, silently slower."""
    root = make_synthetic(tmp_path / "d", images=4, num_classes=40, size=32, panoptic=kind == "panoptic")
    cfg = loader_cfg(root, 0, [3, 7] if kind == "weak-shot" else None)
    loader = make_loader(cfg, [0.0] * 3, [1.0] * 3, D.DistInfo(), 0, segments=kind == "panoptic")
    batch = next(iter(loader))
    tensors = {k: [v] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    from rankseg_core.data.slots import layout

    assert batch_bytes(3, 40, 40, kind == "panoptic", kind == "weak-shot") == layout(tensors)[1]


def test_two_workers_send_batches_through_slots_even_when_the_consumer_keeps_them(tmp_path: Path) -> None:
    """A consumer that keeps every batch (all slots stay taken) still gets the in-process
    batches: the workers fall back to torch's path; those that came through a slot are views
    of it."""
    root = make_synthetic(tmp_path / "d", images=6, num_classes=40, size=32)
    want = [b for b, _ in zip(make_loader(loader_cfg(root, 0), MEAN, STD, D.DistInfo(), 0), range(16))]
    loader = make_loader(loader_cfg(root, 2), MEAN, STD, D.DistInfo(), 0)
    pool = loader.collate_fn.slots  # type: ignore[attr-defined]
    assert pool is not None and pool.per_worker == 6
    it = iter(loader)
    got = [next(it) for _ in range(16)]  # more than the 12 slots
    lo, hi = pool.data.data_ptr(), pool.data.data_ptr() + pool.data.nbytes
    through = [lo <= b["image"].data_ptr() < hi for b in got]
    assert sum(through) == 12 and not all(through)
    assert all(set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b) for a, b in zip(got, want))
    assert int(pool.busy.sum()) == 12 and len(it.worker_pids()) == 2
    del it, loader  # the (persistent) workers stop; what they had in flight took no slot: none was free
    del got
    gc.collect()
    assert int(pool.busy.sum()) == 0  # every slot free again once its batch is gone


def test_the_iterator_alone_keeps_the_slots_alive(tmp_path: Path) -> None:
    """Training keeps only `iter(make_loader(...))`: the pool must live as long as it does."""
    root = make_synthetic(tmp_path / "d", images=6, num_classes=40, size=32)
    want = next(iter(make_loader(loader_cfg(root, 0), MEAN, STD, D.DistInfo(), 0)))
    it = iter(make_loader(loader_cfg(root, 2), MEAN, STD, D.DistInfo(), 0))
    gc.collect()
    got = next(it)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not got["image"].is_shared()  # a view of a slot, not torch's fresh shared memory


def test_the_pin_thread_gets_copies_of_every_tensor_and_the_slot_back_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the DataLoader's pin-memory thread does with a `SlotBatch` (CUDA or not: here
    `Tensor.pin_memory` is stood in for by a copy): every tensor, nested ones included, is a
    copy of the slot's, and the slot is free before the training loop sees the batch."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())
    slots = BatchSlots(workers=1, per_worker=1, capacity=4096)
    batch = items(2, 0)
    nested = {"instances": [{"masks": torch.ones(1, 2, 2, dtype=torch.bool), "ids": torch.tensor([4])}]}
    keys = [k for k in batch[0] if isinstance(batch[0][k], torch.Tensor)]
    sent = slots.write(0, {k: [i[k] for i in batch] for k in keys}, nested)
    assert sent is not None
    got = torch.utils.data._utils.pin_memory.pin_memory(sent)  # the pin thread's own call
    gc.collect()
    assert list(slots.busy) == [0]
    want = collate_clips(batch)
    start = slots.data.data_ptr()
    for k in keys:
        assert torch.equal(got[k], want[k]) and not start <= got[k].data_ptr() < start + slots.capacity
    assert torch.equal(got["instances"][0]["ids"], torch.tensor([4]))
    assert got["instances"][0]["masks"] is not nested["instances"][0]["masks"]  # copied too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches_are_copies_and_free_their_slot_at_once() -> None:
    slots = BatchSlots(workers=1, per_worker=1, capacity=4096)
    batch = items(2, 0)
    sent = write(slots, 0, batch)
    assert sent is not None
    got = sent.pin_memory()
    gc.collect()
    assert list(slots.busy) == [0]
    want = collate_clips(batch)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].is_pinned() and torch.equal(got[k], v)
