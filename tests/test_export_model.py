"""`rankseg export-model`: TorchScript / ONNX files of a run's inference path, checked against
independent computations (the engine's dense whole-image protocol, a hand-made top-kappa,
normalisation done here), and its refusals (one line each)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MASK2FORMER_RUN, assert_one_line_error, make_synthetic, tiny_run
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.engine import export_model, runs
from rankseg_core.engine.configure import build_train_config
from rankseg_core.errors import UserError
from rankseg_core.families import family_of
from rankseg_core.inference.dense import predict_whole
from rankseg_core.model.selection import Selection

K, KAPPA = 40, 5


def cli(*args: object):
    return CliRunner().invoke(app, [os.fspath(a) if isinstance(a, Path) else str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("export") / "data", images=4, num_classes=K, val_images=2)


def save_run(run: Path, data: Path, *sets: str, seed: int = 0) -> Path:
    """A run directory as `rankseg train` leaves it (config + weights), with a non-trivial
    per-rank 1/tau and beta so that the rank order of the channels matters."""
    cfg = build_train_config(None, [*tiny_run(kappa=KAPPA), *sets], data)
    torch.manual_seed(seed)
    model = family_of(cfg.model.model).build(cfg.model)
    norm = getattr(getattr(model, "head", None), "mask_norm", None)
    if norm is not None:
        with torch.no_grad():
            norm.weight.copy_(torch.rand(norm.weight.shape) + 0.5)
            norm.bias.copy_(torch.randn(norm.bias.shape) * 0.1)
    runs.save_config(run, cfg)
    runs.save_weights(runs.run_paths(run).weights, model)
    return run


@pytest.fixture(scope="module")
def rs_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_run(tmp_path_factory.mktemp("runs") / "rankseg", data)


def images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """n x 3 x h x w uint8: other images (and another batch size) than the export's own check."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def reference(run: Path, x: torch.Tensor, kappa: int = KAPPA) -> dict[str, torch.Tensor]:
    """The expected outputs, computed here: normalisation with the backbone's timm mean/std,
    the engine's dense whole-image protocol (`predict_whole`: K channels, -100 for
    unselected classes, resized to the input size), the top-kappa of the ml logits by topk."""
    model, cfg = runs.load_run(run)
    dc = model.data_config()
    mean = torch.tensor(dc["mean"]).reshape(1, 3, 1, 1)
    std = torch.tensor(dc["std"]).reshape(1, 3, 1, 1)
    xn = (x.float() - mean) / std
    with torch.no_grad():
        dense, ml = predict_whole(model, xn, cfg.model.num_classes, return_ml=True, selection=Selection(kappa=kappa))
        ml_logits = model(xn).ml_logits
    out = {"dense": dense, "labels": dense.argmax(1)}
    if ml_logits is not None:
        out["classes"] = ml_logits.topk(kappa, dim=1).indices
        out["ml_probs"] = ml
    return out


def check_against_reference(outputs: tuple[torch.Tensor, ...], names: tuple[str, ...], ref: dict[str, torch.Tensor],
                            ranked: bool) -> None:
    got = dict(zip(names, outputs))
    b, _, h, w = ref["dense"].shape
    assert got["labels"].shape == (b, h, w)
    torch.testing.assert_close(got["labels"].long(), ref["labels"], rtol=0, atol=0)
    if ranked:
        torch.testing.assert_close(got["classes"].long(), ref["classes"], rtol=0, atol=0)
        torch.testing.assert_close(got["ml_probs"], ref["ml_probs"], rtol=0, atol=1e-5)
        # The ranked channels are the dense protocol's channels of those classes, in rank order.
        idx = got["classes"].long()[:, :, None, None].expand(-1, -1, h, w)
        torch.testing.assert_close(got["logits"], ref["dense"].gather(1, idx), rtol=0, atol=1e-4)
    else:
        assert torch.equal(got["classes"].long(), torch.arange(K).expand(b, K))
        torch.testing.assert_close(got["logits"], ref["dense"], rtol=0, atol=1e-4)


def test_torchscript_round_trip_equals_the_eager_protocol(rs_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "exports" / "tiny.pt"
    res = cli("export-model", rs_run, "--out", out)
    assert res.exit_code == 0, res.output
    assert "parity" in res.output and out.is_file()
    assert not list(out.parent.glob("*.tmp"))
    loaded = torch.jit.load(str(out))
    x = images(3, 32, 32, seed=7)  # batch 3: neither the trace's 1 nor the check's 2
    with torch.no_grad():
        outputs = loaded(x)
    names = ("labels", "classes", "logits", "ml_probs")
    assert len(outputs) == len(names)
    check_against_reference(outputs, names, reference(rs_run, x), ranked=True)


def test_kappa_option_is_static_in_the_file(rs_run: Path, tmp_path: Path) -> None:
    r = export_model.export_run(rs_run, tmp_path / "k8.pt", "torchscript", kappa=8)  # trained: 5
    assert r.kappa == 8
    x = images(2, 32, 32, seed=3)
    with torch.no_grad():
        outputs = torch.jit.load(str(r.out))(x)
    assert outputs[1].shape == (2, 8) and outputs[2].shape == (2, 8, 32, 32)
    check_against_reference(outputs, r.outputs, reference(rs_run, x, kappa=8), ranked=True)


def test_class_ordered_baseline_exports_all_k_channels(data: Path, tmp_path: Path) -> None:
    run = save_run(tmp_path / "base", data, "model.head=segmenter", seed=1)
    r = export_model.export_run(run, tmp_path / "base.pt", "torchscript")
    assert r.outputs == ("labels", "classes", "logits") and r.kappa == K
    x = images(2, 32, 32, seed=11)
    with torch.no_grad():
        outputs = torch.jit.load(str(r.out))(x)
    check_against_reference(outputs, r.outputs, reference(run, x), ranked=False)


def test_a_conv_family_rankseg_run_exports(data: Path, tmp_path: Path) -> None:
    # DeepLabv3 (tiny widths): its classifier output is per-pixel logits like Segmenter's.
    sets = ["model.model=deeplabv3-r18", "model.convseg.channels=16", "model.convseg.aux_channels=8",
            "model.convseg.ml_dim=16", "model.convseg.aspp_dilations=1,2", "model.convseg.pool_scales=1,2"]
    run = save_run(tmp_path / "deeplab", data, *sets, seed=4)
    r = export_model.export_run(run, tmp_path / "deeplab.pt", "torchscript")
    x = images(2, 32, 32, seed=12)
    with torch.no_grad():
        outputs = torch.jit.load(str(r.out))(x)
    check_against_reference(outputs, r.outputs, reference(run, x), ranked=True)


def test_onnx_round_trip_equals_the_eager_protocol(data: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    # ONNX at model.img_size: 128 px gives the ml branch's 8 x 8 pooling a whole 8 x 8 patch grid.
    run = save_run(tmp_path / "r128", data, "model.img_size=128", "eval.short_side=128", seed=2)
    out = tmp_path / "tiny.onnx"
    res = cli("export-model", run, "--out", out, "--format", "onnx")
    assert res.exit_code == 0, res.output
    sess = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images"]
    names = tuple(o.name for o in sess.get_outputs())
    assert names == ("labels", "classes", "logits", "ml_probs")
    x = images(1, 128, 128, seed=5)
    outputs = tuple(torch.from_numpy(np.asarray(o)) for o in sess.run(None, {"images": x.numpy()}))
    check_against_reference(outputs, names, reference(run, x), ranked=True)


def test_a_failed_parity_check_writes_nothing(rs_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: an exported file whose logits drift is refused and not written."""
    real = export_model._torchscript_runner

    def drifting(data: bytes):
        run = real(data)
        return lambda x: tuple(t + 0.01 if t.is_floating_point() and t.dim() == 4 else t for t in run(x))

    monkeypatch.setattr(export_model, "_torchscript_runner", drifting)
    out = tmp_path / "drift.pt"
    with pytest.raises(UserError, match="logits differ .* not written"):
        export_model.export_run(rs_run, out, "torchscript")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_compare_catches_label_and_class_changes() -> None:
    names = ("labels", "classes", "logits")
    logits = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])  # 1 x 2 x 1 x 2, margins of 1
    classes = torch.tensor([[3, 7]])
    labels = classes.gather(1, logits.argmax(1).flatten(1)).reshape(1, 1, 2)
    want = (labels, classes, logits)
    assert export_model.compare(want, want, names) == 0.0
    with pytest.raises(UserError, match="other classes"):
        export_model.compare((labels, torch.tensor([[7, 3]]), logits), want, names)
    with pytest.raises(UserError, match="labels 1 pixels differently"):
        export_model.compare((torch.tensor([[[3, 3]]]), classes, logits), want, names)


def test_bad_inputs_are_one_line(rs_run: Path, data: Path, tmp_path: Path) -> None:
    exists = tmp_path / "exists.pt"
    exists.write_bytes(b"keep")
    assert_one_line_error(cli("export-model", rs_run, "--out", exists), "exists", "never replaces")
    assert exists.read_bytes() == b"keep"
    assert_one_line_error(cli("export-model", rs_run, "--out", rs_run / "m.pt"), "inside the run directory")
    assert_one_line_error(cli("export-model", rs_run, "--out", tmp_path / "a.pt", "--format", "tflite"),
                          "--format tflite", "torchscript or onnx")
    assert_one_line_error(cli("export-model", rs_run, "--out", tmp_path / "a.pt", "--size", "40"),
                          "--size 40", "multiples of 32")
    assert_one_line_error(cli("export-model", rs_run, "--out", tmp_path / "a.pt", "--kappa", "0"), "--kappa 0")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("export-model", tmp_path / "empty", "--out", tmp_path / "a.pt"),
                          "not a rankseg run directory")
    oracle = save_run(tmp_path / "oracle", data, "model.oracle=true")
    assert_one_line_error(cli("export-model", oracle, "--out", tmp_path / "a.pt"), "oracle", "cannot be exported")
    assert not (tmp_path / "a.pt").exists()


def test_other_runs_are_refused_before_any_work(data: Path) -> None:
    cfg = build_train_config(None, tiny_run(kappa=KAPPA), data)
    video = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, clip_len=2))
    with pytest.raises(UserError, match="video run"):
        export_model.check_exportable(video)
    sel = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, selector=dataclasses.replace(cfg.model.selector, run="runs/clf")))
    assert sel.model.has_selector
    with pytest.raises(UserError, match="frozen classifier"):
        export_model.check_exportable(sel)


def test_mask2former_is_refused_in_one_line(data: Path, tmp_path: Path) -> None:
    sets = [s for s in TINY_MASK2FORMER_RUN if not s.startswith(("model.kappa", "model.img_size", "eval.short_side"))]
    cfg = build_train_config(None, [*sets, "model.kappa=5", "model.img_size=64", "eval.short_side=64"], data)
    run = tmp_path / "m2f"
    runs.save_config(run, cfg)
    torch.manual_seed(0)
    runs.save_weights(runs.run_paths(run).weights, family_of(cfg.model.model).build(cfg.model))
    assert_one_line_error(cli("export-model", run, "--out", tmp_path / "m.pt"), "not per-pixel class logits")


def test_parse_size() -> None:
    assert export_model.parse_size("64") == (64, 64)
    assert export_model.parse_size("64x96") == (64, 96)
    for bad in ("0", "65", "64x", "axb", "64x64x64"):
        with pytest.raises(UserError, match="--size"):
            export_model.parse_size(bad)
