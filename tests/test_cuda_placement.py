"""Every model family's training, evaluation and prediction placed for a GPU, checked without
one (issue 24: targets built on the device; a CUDA run must not meet a CPU tensor).

Nothing in this project has a GPU to run on in CI, and on a CPU-only machine every tensor is
on the CPU: a test suite cannot see an op that would meet tensors of two devices on a GPU, or a
`.numpy()` of a device tensor. tests/virtual_cuda.py emulates a CUDA device on the CPU and
checks every op with PyTorch's own device rules (its FakeTensors). The first tests check that
emulation against PyTorch's documented CUDA behaviour, hand-built case by case; the rest train
(`--device cuda`: the engine's CUDA branches, the loader's pinned batches), evaluate and predict
each family's tiny recipe under it, and one plants a placement bug to see it caught.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FAMILY_RECIPES, recipe_data, weak_shot_split
from PIL import Image
from torch.utils.data._utils import pin_memory as pin_utils
from typer.testing import CliRunner
from virtual_cuda import CUDA, DeviceMismatch, virtual_cuda

from rankseg_core.api import load_run
from rankseg_core.data import slots
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.train import train

# ---------------------------------------------------------------------------------------
# The emulation against PyTorch's CUDA rules


def test_mixing_devices_raises_where_cuda_does() -> None:
    with virtual_cuda():
        x = torch.ones(4, device="cuda")
        host = torch.arange(4.0)
        with pytest.raises(DeviceMismatch, match="aten.add.Tensor"):
            x + host  # a CPU tensor of one or more dimensions
        with pytest.raises(DeviceMismatch, match="aten.mm"):
            torch.ones(2, 4, device="cuda") @ torch.ones(4, 3)
        with pytest.raises(DeviceMismatch, match="index_put_"):
            x[torch.tensor([0, 1])] = torch.tensor([5.0, 6.0])  # values on the CPU
        with pytest.raises(DeviceMismatch, match="cat"):
            torch.cat([x, host])
        with pytest.raises(DeviceMismatch, match="masked_select"):  # value-dependent: the basic rule
            x.masked_select(torch.tensor([True, False, True, False]))
        # Allowed on a GPU: a CPU 0-dim tensor as a scalar, CPU index tensors, Python numbers.
        assert (x + torch.tensor(2.0)).device == CUDA
        assert x[torch.tensor([0, 2])].device == CUDA
        x[torch.tensor([0, 1])] = torch.tensor(7.0)
        assert (x * 3).device == CUDA and x.sum().device == CUDA


def test_moves_factories_and_numpy_behave_as_on_a_gpu() -> None:
    with virtual_cuda():
        x = torch.tensor([[1.5, -2.0]], device="cuda")
        assert x.device == CUDA and x.is_cuda and not x.is_cpu and x.get_device() == 0
        assert x.to(torch.float16).device == CUDA  # a dtype change stays on the device
        assert x.new_zeros(3).device == CUDA and torch.zeros_like(x).device == CUDA
        assert torch.arange(3, device=x.device).device == CUDA
        assert x.nonzero().device == CUDA  # value-dependent shape, on the input's device
        host = x.cpu()
        assert host.device.type == "cpu" and host.tolist() == [[1.5, -2.0]]
        np.testing.assert_array_equal(host.numpy(), [[1.5, -2.0]])
        with pytest.raises(TypeError, match="cuda:0 device type tensor to numpy"):
            x.numpy()
        assert torch.ones(2).to(x).device == CUDA and x.to(host).device.type == "cpu"
        assert torch.ones(2).cuda().device == CUDA and torch.ones(2).pin_memory().device.type == "cpu"
        assert float(x.sum()) == -0.5  # the values are real
    assert x.device.type == "cpu"  # the block's end undoes the emulation


def test_a_module_trains_on_the_device() -> None:
    """Parameters, gradients and optimizer state (fused AdamW) all on the device; autocast."""
    torch.manual_seed(0)
    with virtual_cuda() as mode:
        lin = torch.nn.Linear(3, 2).to("cuda")
        opt = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True)
        lin(torch.randn(5, 3, device="cuda")).square().mean().backward()
        opt.step()
        assert lin.weight.device == CUDA and lin.weight.grad is not None and lin.weight.grad.device == CUDA
        assert opt.state[lin.weight]["exp_avg"].device == CUDA
        with pytest.raises(DeviceMismatch):
            lin(torch.randn(5, 3))  # input left on the host
        with torch.autocast("cuda", dtype=torch.bfloat16):  # CUDA autocast casts a linear layer's inputs
            y = lin(torch.randn(5, 3, device="cuda"))
        assert y.dtype == torch.bfloat16 and y.device == CUDA and mode.autocast
    assert mode.checked > 10


# ---------------------------------------------------------------------------------------
# Each family's tiny recipe under the emulated device

# Every family's recipe (conftest), with AMP as a GPU with bfloat16 runs it (the default); and
# the loader's workers (their batches pinned in the pin thread) and the other two precisions.
SEGMENTER = FAMILY_RECIPES["segmenter-vitt rankseg"][1]
CASES: dict[str, tuple[str, list[str]]] = {
    **FAMILY_RECIPES,
    "segmenter-vitt rankseg, 2 workers": ("images", [*SEGMENTER, "data.num_workers=2"]),
    "segmenter-vitt rankseg, fp16 + GradScaler": ("images", SEGMENTER),
    "segmenter-vitt rankseg, fp32 (--no-amp)": ("images", [*SEGMENTER, "amp=false"]),
}

# `rankseg predict` refuses these runs: a classifier does not segment, an oracle needs GT classes.
NO_PREDICT = {"classifier-vitt", "segmenter-vitt oracle"}
# The other commands that take --device, each on a run it applies to: (run, shards, image, tmp) -> argv.
MORE: dict[str, Any] = {
    "segmenter-vitt rankseg": lambda run, data, img, tmp: [
        ["viz", "false-positives", run, "--data", data, "--num", "1", "--stats-num", "2", "--out", tmp / "fp"],
        ["viz", "predictions", run, "--data", data, "--num", "1", "--out", tmp / "pred"]],
    "segmenter-vitt protoseg": lambda run, data, img, tmp: [["viz", "prototypes", run, img, "--out", tmp / "p.png"]],
    "maskformer-r50 weak-shot": lambda run, data, img, tmp: [["pseudo-label", run, "--out", tmp / "pseudo"]],
    "mask2former-r50 video instances": lambda run, data, img, tmp: [
        ["predict-vis", run, "--data", data, "--out", tmp / "results.json"]],
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("placement")
    return {**{kind: recipe_data(base / kind, kind) for kind in ("images", "panoptic", "video")},
            "split": weak_shot_split(base / "weak_shot.json")}


@pytest.mark.slow  # 3-12 s each on one core
@pytest.mark.parametrize("name", list(CASES))
def test_family_trains_evaluates_and_predicts_on_a_gpu(name: str, roots: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two steps with --device cuda and AMP (the batches through the loader's pinned path), the
    final evaluation, then `rankseg eval`, `rankseg predict` and the API's `Run.predict` (image
    runs) and the run's other commands that take --device (`MORE`) on the device: no op meets
    tensors of two devices and nothing reads a device tensor as numpy."""
    from rankseg_cli.app import app

    kind, sets = CASES[name]
    sets = ["device=cuda", "amp=true", "schedule.iters=2", "ckpt_every=2", "log_every=1",
            *[s.replace("SPLIT", str(roots["split"])) for s in sets if not s.startswith("device=")]]
    cfg = build_train_config(None, sets, roots[kind])
    run = tmp_path / "run"
    pinned: list[str] = []  # what the DataLoader pinned: SlotBatch (from workers) or the batch dict
    pin_fn, pin_slot = pin_utils.pin_memory, slots.SlotBatch.pin_memory
    monkeypatch.setattr(pin_utils, "pin_memory", lambda data, device=None: pinned.append(type(data).__name__)
                        or pin_fn(data, device))
    monkeypatch.setattr(slots.SlotBatch, "pin_memory", lambda self: pinned.append("slot") or pin_slot(self))
    with virtual_cuda(bf16="fp16" not in name) as mode:
        res = train(cfg, run, progress=False)
        assert res.final_eval is not None  # the evaluation ran on the device too
        cli = CliRunner()
        ev = cli.invoke(app, ["eval", str(run), "--device", "cuda", "--max-images", "1"])
        assert ev.exit_code == 0, (ev.output, ev.exception)
        img = tmp_path / "in.png"
        Image.fromarray(np.full((40, 56, 3), 90, np.uint8)).save(img)
        commands = [] if kind == "video" or name in NO_PREDICT else [["predict", run, img, "--out", tmp_path / "out"]]
        for argv in commands + (MORE[name](run, roots[kind], img, tmp_path) if name in MORE else []):
            r = cli.invoke(app, [*map(str, argv), "--device", "cuda"])
            assert r.exit_code == 0, (argv[:2], r.output, r.exception)
        if commands:  # the Python API's in-memory prediction (docs/api.md) on the device too
            assert load_run(run, device="cuda").predict(np.full((40, 56, 3), 90, np.uint8)).label.shape == (40, 56)
    assert mode.checked > 1000  # ops on the device's tensors: the work ran under the emulation
    assert mode.autocast == ({"amp=false"}.isdisjoint(sets)), mode.autocast  # AMP ran where configured
    # fp16 (a GPU without bfloat16) steps through a GradScaler, whose state the checkpoint keeps.
    assert ("scaler" in torch.load(run / "checkpoints" / "last.pt", weights_only=True)) == ("fp16" in name)
    # The loader pins every training batch: in-process, or the workers' slots in the pin thread.
    assert pinned and ("slot" in pinned) == ("workers" in name), pinned


def _host_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    """data/device.py `_mean_std` without its `.to(device)`: the normalisation constants on the host."""
    from rankseg_core.data import device as dev

    monkeypatch.setattr(dev, "_mean_std", lambda device, mean, std: (
        torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)))


def _host_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ranked classes' index copied to the host before the head gathers with it."""
    from rankseg_core.model import heads

    real = heads.select_for
    monkeypatch.setattr(heads, "select_for", lambda *a, **k: tuple(
        None if t is None else t.cpu() for t in real(*a, **k)))


@pytest.mark.slow
@pytest.mark.parametrize("plant, where", [(_host_constants, r"sub_.*data/device.py.*normalize_images"),
                                          (_host_selection, r"gather.*model/heads.py.*forward")],
                         ids=["data", "model"])
def test_a_planted_placement_bug_is_caught(plant: Any, where: str, roots: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor left on the host where the step needs it on the device: on a GPU the first
    step would fail, so it must fail here, naming the op and the line."""
    plant(monkeypatch)
    cfg = build_train_config(None, [*SEGMENTER, "device=cuda", "amp=false", "schedule.iters=1"], roots["images"])
    with virtual_cuda(), pytest.raises(DeviceMismatch, match=where):
        train(cfg, tmp_path / "run", progress=False)


@pytest.mark.slow  # ~40 s: 2 models x 2 AMP settings x legacy / new, 2 steps each
def test_gpu_benchmark_runs_its_cuda_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench/bench_train.py --gpu` (the step benchmark a session with a GPU runs, on borrowed
    minutes) through its CUDA branches, at the tiny scale: AMP and no AMP rows, legacy and new
    statistics, each row complete. The CUDA runtime's timing and memory calls stand in as no-ops."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_train

    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 3 * 2**30)
    with virtual_cuda():
        table = bench_train.gpu_table(CUDA, cpu_scale=True, iters=1, warmup=1, workers=0, repeats=1)
    rows = table.splitlines()[2:]
    # Each model: bf16 and off, legacy and new; every row measured (no OOM), peak memory read.
    assert [r.split(" | ")[1:3] for r in rows] == [
        [amp, what] for _ in bench_train.CPU_MODELS for amp in ("bf16", "off")
        for what in ("legacy: host copy every step", "new: on device, gathered")]
    assert all(r.split(" | ")[4] == "3.0" for r in rows), table


@pytest.mark.slow  # ~20 s
def test_demo_runs_on_a_gpu(tmp_path: Path) -> None:
    """`rankseg demo` (the README's first command; `--device auto` picks the GPU), small."""
    from rankseg_cli.app import app

    with virtual_cuda() as mode:
        res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--images", "24", "--iters", "2",
                                       "--num-classes", "60"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert mode.checked > 1000 and (tmp_path / "demo" / "demo_results.json").is_file()
