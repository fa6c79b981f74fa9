"""No host sync inside the training step (issue 24 item 3).

On a CPU nothing "syncs", so the step runs on the CUDA device emulated by tests/virtual_cuda.py
(`--device cuda`: every tensor knows whether a GPU run would hold it on the device or the host)
and is watched for what WOULD wait for a GPU:
- the ops that read a device tensor's values on the host (`aten._local_scalar_dense`:
  `.item()`, `bool(t)`, `float(t)`, `if t.any()`) or whose output size depends on them
  (`nonzero`, `masked_select`, boolean-mask indexing, `unique`, `bincount`,
  `repeat_interleave`), seen by a TorchDispatchMode;
- the explicit device-to-host copies `.cpu()`, `.numpy()`, `.tolist()` of device tensors, seen
  by patching `torch.Tensor`;
- blocking host-to-device copies (`.to(device)` without `non_blocking`, `torch.tensor(...,
  device=)`, `copy_` from the host): CUDA waits for the stream before such a copy returns.
Ops on host tensors are host work and not counted (the matcher's scipy input, the per-batch
target tables, the instances a batch carries as lists). The step = `_forward_backward` +
`_optimizer_step`; the loop's gather points (`Window.gather`, checkpoints, evaluation) are
where syncs belong.

A tiny Segmenter-RankSeg step must have none; a tiny Mask2Former step only the documented
transfers: one target table per batch (`semantic_targets` / `panoptic_targets`), one
selected-column table per batch (`column_targets`) and the Hungarian matcher's cost matrix
per image and decoder layer (`documented_transfers`). On a CUDA machine every family's steps
also run under `torch.cuda.set_sync_debug_mode("error")`, relaxed only at those call sites
(`_strict_steps`, whose wiring runs on the emulated device too).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FAMILY_RECIPES, TINY_MASK2FORMER_RUN, make_synthetic, recipe_data, tiny_run, weak_shot_split
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from virtual_cuda import VirtualCuda, virtual_cuda

from rankseg_core.engine import train as T
from rankseg_core.engine.configure import build_train_config

A = torch.ops.aten
# Ops that read device memory on the host before returning (their output shape, or a scalar).
SYNC_OPS = {A._local_scalar_dense.default, A.nonzero.default, A.masked_select.default, A._unique2.default,
            A.unique_dim.default, A.unique_consecutive.default, A.bincount.default, A.repeat_interleave.Tensor,
            A.equal.default, A.is_nonzero.default}
BOOL_INDEXING = {A.index.Tensor, A.index_put_.default, A.index_put.default, A._index_put_impl_.default}
H2D = "host->device copy"  # a blocking one

Site = tuple[str, str, str]  # (what, file, function)


def _site(what: str) -> Site:
    """The innermost rankseg_core frame of the call (torch internals are attributed to the
    rankseg line that called them)."""
    f = sys._getframe(2)
    while f is not None and "/rankseg_core/" not in f.f_code.co_filename:
        f = f.f_back
    if f is None:
        return (what, "?", "?")
    return (what, f.f_code.co_filename.split("/rankseg_core/")[-1], f.f_code.co_name)


class SyncCounter(TorchDispatchMode):
    """Counts would-be host syncs by call site while `active` (see the module docstring), on
    the device emulated by `cuda` (enter it inside `virtual_cuda()`)."""

    def __init__(self, cuda: VirtualCuda, strict: Any = None) -> None:
        super().__init__()
        self.cuda = cuda
        self.calls: Counter[Site] = Counter()
        self.active = False
        # strict(): whether a sync must raise now, as under set_sync_debug_mode("error")
        self.strict = strict

    def _hit(self, site: Site) -> None:
        if self.strict is not None and self.strict():
            raise AssertionError(f"a host sync under the strict mode: {site}")
        self.calls[site] += 1

    def on_device(self, t: torch.Tensor) -> bool:
        return self.cuda.device_of(t).type == "cuda"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if self.active:
            self._watch(func, args, kwargs)
        return func(*args, **kwargs)

    def _watch(self, func: Any, args: Any, kwargs: Any) -> None:
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in SYNC_OPS or (func in BOOL_INDEXING and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))):
            if any(self.on_device(t) for t in tensors):
                self._hit(_site(str(func.overloadpacket.__name__)))
        elif func is A._to_copy.default:  # .to(device) / torch.tensor(..., device=)
            target = kwargs.get("device")
            if (target is not None and torch.device(target).type == "cuda" and not self.on_device(args[0])
                    and not kwargs.get("non_blocking", False)):
                self._hit(_site(H2D))
        elif func is A.copy_.default and args[1].dim() > 0:
            # (0-dim sources excepted: `t[i] = number` reaches the dispatcher as a copy from a
            # scalar tensor made on the tensor's real device, the CPU here; on a GPU it is made
            # on the GPU, by a fill)
            blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            if blocking and self.on_device(args[0]) and not self.on_device(args[1]):
                self._hit(_site(H2D))

    @contextmanager
    def patched(self) -> Iterator[SyncCounter]:
        """The explicit copies of device tensors to the host, then the dispatch mode."""
        with pytest.MonkeyPatch.context() as mp:  # (inside virtual_cuda: undone before its own patches)
            for name in ("cpu", "numpy", "tolist"):
                real = getattr(torch.Tensor, name)

                def copy(t: torch.Tensor, *a: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
                    if self.active and self.on_device(t):
                        self._hit(_site(f".{_name}()"))
                    return _real(t, *a, **k)

                mp.setattr(torch.Tensor, name, copy)
            with self:
                yield self


def _watch_steps(monkeypatch: pytest.MonkeyPatch, counter: SyncCounter) -> dict[str, int]:
    """Count inside `_forward_backward` / `_optimizer_step` only; returns the step count."""
    steps = {"n": 0}
    for name in ("_forward_backward", "_optimizer_step"):
        real = getattr(T, name)

        def watched(*a: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
            counter.active = True
            try:
                return _real(*a, **k)
            finally:
                counter.active = False
                steps["n"] += _name == "_optimizer_step"

        monkeypatch.setattr(T, name, watched)
    # The loader's copy to the device (non-blocking, from pinned memory) is outside the step.
    real_next = T.to_device

    def to_device(batch: Any, *a: Any, **k: Any) -> Any:
        was, counter.active = counter.active, False
        try:
            return real_next(batch, *a, **k)
        finally:
            counter.active = was

    monkeypatch.setattr(T, "to_device", to_device)
    return steps


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sets: list[str], kind: str = "images"
         ) -> tuple[Counter[Site], int]:
    """Three training steps on the emulated CUDA device (AMP as configured: bf16 by default)."""
    sets = ["device=cuda", *(s for s in sets if not s.startswith("device=")), "schedule.iters=3", "data.val_split=",
            "log_every=3", "ckpt_every=3"]
    cfg = build_train_config(None, sets, recipe_data(tmp_path / "data", kind))
    with virtual_cuda() as cuda:
        counter = SyncCounter(cuda)
        steps = _watch_steps(monkeypatch, counter)
        with counter.patched():
            T.train(cfg, tmp_path / "run", progress=False)
    return counter.calls, steps["n"]


def test_counter_sees_the_syncs_it_must() -> None:
    """The detector itself: each kind of sync is counted once, host work is not."""
    with virtual_cuda() as cuda:
        counter = SyncCounter(cuda)
        x = torch.zeros(3, device="cuda") + torch.tensor([0.5, -1.0, 2.0]).to("cuda", non_blocking=True)
        host = torch.tensor([1.0, 0.0])
        with counter.patched():
            counter.active = True
            float(x.sum())
            bool((x > 0).any())
            x[x > 0]
            x.nonzero()
            torch.unique(x)
            x.cpu()
            h = (x > 0).cpu()  # host data from here on
            h.nonzero()
            bool(h.any())
            host[host > 0].tolist()
            torch.where(x > 0, x, 0).sum()  # device-side: nothing
            torch.tensor([1.0, 2.0], device=x.device)  # python data to the device: a blocking copy
            host.to(x.device)  # a blocking copy
            host.to(x.device, non_blocking=True)  # not waited for
            x[:2].copy_(host)  # a blocking copy
            x[0] = 3.0  # a fill on a GPU: nothing
            x.new_full((), 2.0)  # a fill: nothing
    kinds = Counter(what for what, _, _ in counter.calls.elements())
    assert kinds == {"_local_scalar_dense": 2, "index": 1, "nonzero": 1, "_unique2": 1, ".cpu()": 2, H2D: 3}


@pytest.mark.slow
def test_segmenter_rankseg_step_has_no_host_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls, steps = _run(tmp_path, monkeypatch, tiny_run() + ["optim.name=adamw"])
    assert steps == 3
    assert calls == Counter(), dict(calls)


# The pixel decoder's deformable attention divides offsets by each level's (w, h): a host-to-
# device copy, made once per set of level shapes and then cached (deform_attn.py `level_sizes`),
# so a run of fixed-size crops copies it at most once, in its first step.
KNOWN_ELSEWHERE = (H2D, "model/mask2former/deform_attn.py", "level_sizes")


def documented_transfers(name: str, steps: int, batch: int = 2, layers: int = 3 + 1) -> tuple[dict[Site, int], set[Site]]:
    """The transfers a FAMILY_RECIPES entry's step may make, each with how often at most in
    `steps` steps (batch: images or clips per step; layers: dec_layers = 3 aux + the final
    prediction), and those that happen exactly once per step (the per-batch tables): none but
    for the oracle and the mask classifiers (docs/training.md "When training statistics reach
    the host")."""
    if name == ORACLE:  # the batch's GT classes become the selection: one table
        return {ORACLE_TABLE: steps}, {ORACLE_TABLE}
    if not name.startswith(MASK_CLASSIFIERS):
        return {}, set()
    columns = (".cpu()", "losses/mask2former.py", "column_targets")
    allowed = {KNOWN_ELSEWHERE: 1,  # the first step's, then cached
               columns: steps,  # one per batch
               (".cpu()", "losses/matcher.py", "assign_pairs"): steps * batch * layers}  # at most
    exact = {columns}
    table = TARGET_TABLES.get(name, ("losses/targets.py", "semantic_targets"))
    if table is not None:
        allowed[(".cpu()", *table)] = steps  # one target table per batch
        exact.add((".cpu()", *table))
    return allowed, exact


# Every family of conftest's FAMILY_RECIPES: no sync in the step, or only the documented
# transfers: the oracle ablation one table of the batch's classes; the mask classifiers
# (SimFormer and the video families included) theirs, the selected columns and the matcher's
# cost matrices (docs/training.md "When training statistics reach the host").
ORACLE = "segmenter-vitt oracle"
ORACLE_TABLE = (".cpu()", "losses/rankseg.py", "present_classes")
# Where each mask classifier's batch of targets reaches the host (default: `semantic_targets`,
# for clips too, on a clip's frames stacked).
TARGET_TABLES: dict[str, tuple[str, str] | None] = {
    "mask2former-r50 panoptic": ("losses/targets.py", "panoptic_targets"),
    "maskformer-r50 weak-shot": ("losses/simformer.py", "weak_shot_targets"),  # base classes + image labels
    "mask2former-r50 video instances": None}  # tracks built on the host from the batch's instance lists
MASK_CLASSIFIERS = ("mask2former-", "maskformer-")


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in FAMILY_RECIPES if n != "segmenter-vitt rankseg"])
def test_every_family_step_syncs_only_where_documented(name: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    kind, sets = FAMILY_RECIPES[name]
    sets = [s.replace("SPLIT", str(weak_shot_split(tmp_path / "split.json"))) for s in sets]
    calls, steps = _run(tmp_path, monkeypatch, sets, kind)
    assert steps == 3
    allowed, exact = documented_transfers(name, steps)
    assert set(calls) <= set(allowed), {k: v for k, v in calls.items() if k not in allowed}
    for site, most in allowed.items():
        assert calls[site] <= most, (site, calls[site], most)
    for site in exact:
        assert calls[site] == steps, (site, calls[site])
    if name.startswith(MASK_CLASSIFIERS):
        assert calls[(".cpu()", "losses/matcher.py", "assign_pairs")] > 0  # the matcher did run


def test_window_gathers_what_the_host_loop_summed() -> None:
    """Window against the host arithmetic it replaces: per step, finite values summed and
    counted per key; gathered at arbitrary points; the first non-finite loss reported."""
    keys = ("loss", "recall")
    steps = [[1.0, 0.5], [2.0, float("nan")], [0.25, 1.0], [4.0, 0.0], [float("inf"), 1.0], [float("nan"), 2.0]]
    w = T.Window(keys)
    sums, counts = {k: 0.0 for k in keys}, {k: 0 for k in keys}
    for i, v in enumerate(steps[:4], start=1):
        w.add(torch.tensor(v), 2, i)
        for k, x in zip(keys, v):
            if x == x and abs(x) != float("inf"):
                sums[k] += x
                counts[k] += 1
        if i in (1, 4):  # gather points
            loss, bad = w.gather()
            assert bad is None
    assert loss == pytest.approx((2.0 + 0.25 + 4.0) / 3)
    assert w.means() == pytest.approx({k: sums[k] / counts[k] for k in keys})
    assert w.samples == 8
    # A checkpoint keeps the gathered part; a resumed Window continues from it.
    state = w.state()
    resumed = T.Window(keys, state)
    for i, v in enumerate(steps[4:], start=5):
        resumed.add(torch.tensor(v), 2, i)
    with pytest.raises(RuntimeError, match="gather"):
        resumed.state()  # never checkpoint what was not gathered
    loss, bad = resumed.gather()
    assert bad == (5, float("inf"))  # the FIRST non-finite loss, with its iteration
    assert resumed.means()["recall"] == pytest.approx((sums["recall"] + 3.0) / (counts["recall"] + 2))
    assert loss != loss  # no finite loss among those steps: NaN


def _strict_steps(name: str, tmp_path: Path) -> None:
    """Three training steps of a FAMILY_RECIPES entry with `torch.cuda.set_sync_debug_mode
    ("error")` inside the step, relaxed only for the documented transfers (by call site, the
    same table as the count) and the loader's copy to the device."""
    kind, sets = FAMILY_RECIPES[name]
    tmp_path.mkdir(parents=True, exist_ok=True)
    sets = ["device=cuda", "amp=true", *(s.replace("SPLIT", str(weak_shot_split(tmp_path / "split.json")))
                                         for s in sets if not s.startswith("device=")),
            "schedule.iters=3", "data.val_split=", "log_every=3", "ckpt_every=3"]
    cfg = build_train_config(None, sets, recipe_data(tmp_path / "data", kind))
    allowed = set(documented_transfers(name, 3)[0])

    def relaxed(fn: Any, what: str | None = None) -> Any:
        """fn with the mode off (for every call, or where the call's site is allowed)."""
        def call(*a: Any, **k: Any) -> Any:
            if what is not None and _site(what) not in allowed:
                return fn(*a, **k)
            was = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return fn(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode(was)
        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "cpu", relaxed(torch.Tensor.cpu, ".cpu()"))
        for factory in ("tensor", "as_tensor"):  # (deform_attn's cached level sizes)
            mp.setattr(torch, factory, relaxed(getattr(torch, factory), H2D))
        for step in ("_forward_backward", "_optimizer_step"):
            real = getattr(T, step)

            def strict(*a: Any, _real: Any = real, **k: Any) -> Any:
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return _real(*a, **k)
                finally:
                    torch.cuda.set_sync_debug_mode(0)

            mp.setattr(T, step, strict)
        mp.setattr(T, "to_device", relaxed(T.to_device))  # the loader's copy (from pinned memory)
        T.train(cfg, tmp_path / "run", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: set_sync_debug_mode checks real syncs")
@pytest.mark.parametrize("name", list(FAMILY_RECIPES))
def test_cuda_step_under_sync_debug_mode(name: str, tmp_path: Path) -> None:
    """On a GPU: every sync inside the step raises, except the documented transfers, which
    run with the mode relaxed (the only places the host must know a device value)."""
    _strict_steps(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["segmenter-vitt rankseg", "segmenter-vitt oracle", "maskformer-r50 weak-shot",
                                  "mask2former-r50 video instances"])
def test_strict_steps_relax_only_the_documented_transfers(name: str, tmp_path: Path) -> None:
    """The GPU test's own wiring, on the emulated device: `set_sync_debug_mode` kept in a
    variable, and every would-be sync raising while it says "error". Its steps pass (the
    relaxed call sites are the documented ones), and one more sync in the step is caught."""
    mode: dict[str, Any] = {"v": 0}
    with virtual_cuda() as cuda, pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "set_sync_debug_mode", lambda v: mode.update(v=v))
        mp.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode["v"])
        counter = SyncCounter(cuda, strict=lambda: mode["v"] in ("error", 2))
        counter.active = True
        with counter.patched():
            _strict_steps(name, tmp_path / "ok")
            assert name == "segmenter-vitt rankseg" or counter.calls  # the documented transfers ran, relaxed
            real = T._optimizer_step

            def one_more(*a: Any, **k: Any) -> Any:  # a planted sync: a loss read on the host
                float(torch.zeros((), device="cuda").sum())
                return real(*a, **k)

            mp.setattr(T, "_optimizer_step", one_more)
            with pytest.raises(AssertionError, match="strict mode.*_local_scalar_dense"):
                _strict_steps(name, tmp_path / "planted")


# ---------------------------------------------------------------------------------------
# The GPU path's options (issue 22 item 8): --amp/--no-amp and channels_last


def test_cli_amp_flag_sets_the_key(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rankseg_cli.common import new_app
    from rankseg_cli.train_cmds import train as train_cmd

    app = new_app("test")
    app.command("train")(train_cmd)
    app.command("noop")(lambda: None)  # two commands: `train` stays a subcommand
    data = make_synthetic(tmp_path / "data", num_classes=40, images=2, val_images=1, size=32)
    seen = {}
    for flag in ("--amp", "--no-amp", None):
        res = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--dry-run",
                                       *([flag] if flag else []), *sum((["--set", s] for s in tiny_run()), [])])
        assert res.exit_code == 0, res.output
        seen[flag] = [ln for ln in res.output.splitlines() if ln.startswith("amp:")]
    assert seen == {"--amp": ["amp: true"], "--no-amp": ["amp: false"], None: ["amp: true"]}


@pytest.mark.slow
def test_channels_last_changes_the_layout_not_the_losses(tmp_path: Path) -> None:
    """A ResNet Mask2Former trained 2 steps with channels_last: the conv weights are NHWC in
    the checkpoint, and the logged losses equal the NCHW run's to float rounding."""
    data = make_synthetic(tmp_path / "data", num_classes=40, images=4, val_images=1, size=64)
    losses = {}
    for cl in (False, True):
        cfg = build_train_config(None, TINY_MASK2FORMER_RUN + ["schedule.iters=2", "data.val_split=", "log_every=1",
                                                               f"channels_last={str(cl).lower()}"], data)
        run = tmp_path / f"run{cl}"
        T.train(cfg, run, progress=False)
        from rankseg_core.engine import runs

        losses[cl] = [r["loss"] for r in runs.read_metrics(run) if r["type"] == "train"]
        weights = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
        convs = [v for v in weights.values() if v.dim() == 4 and v.shape[-1] > 1 and v.shape[1] > 1]
        assert convs and all(v.is_contiguous(memory_format=torch.channels_last) == cl for v in convs)
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


@pytest.mark.slow
def test_resume_mid_window_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint inside a log window (ckpt_every 2, log_every 3): the window gathered for
    the checkpoint and restored on resume gives the uninterrupted run's log lines exactly."""
    from conftest import train_until_checkpoint

    from rankseg_core.engine import runs

    data = make_synthetic(tmp_path / "data", num_classes=40, images=4, val_images=1, size=32)
    sets = tiny_run() + ["schedule.iters=6", "ckpt_every=2", "log_every=3", "data.val_split="]
    full, cut = tmp_path / "full", tmp_path / "cut"
    T.train(build_train_config(None, sets, data), full, progress=False)
    train_until_checkpoint(monkeypatch, 4, lambda: T.train(build_train_config(None, sets, data), cut, progress=False))
    T.train(build_train_config(None, sets, data), cut, resume=True, progress=False)

    def rows(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in runs.read_metrics(run)
                if r["type"] == "train"]

    assert [r["iter"] for r in rows(full)] == [3, 6]
    assert rows(cut) == rows(full)  # the iteration-6 line averages steps 4 (before) and 5-6 (after)
