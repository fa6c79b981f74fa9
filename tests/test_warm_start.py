"""`--init-from`: a fresh run starts from another run's / file's weights (mmseg's load_from)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, make_synthetic, tiny_run
from typer.testing import CliRunner

from rankseg_cli.common import new_app
from rankseg_cli.train_cmds import evaluate
from rankseg_cli.train_cmds import train as train_cmd
from rankseg_core.config.model import ModelConfig
from rankseg_core.engine import runs
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.train import train
from rankseg_core.engine.warm_start import warm_start
from rankseg_core.errors import UserError
from rankseg_core.families.segmenter import SEGMENTER

K = 40
TINY = tiny_run(model=None) + ["data.val_split="]


def cli_app():
    app = new_app("test")
    app.command("train")(train_cmd)
    app.command("eval")(evaluate)  # two commands: typer keeps the command names
    return app


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ws") / "data"
    make_synthetic(out, num_classes=K, images=8, val_images=2, size=32, seed=0)
    return out


@pytest.fixture(scope="module")
def classifier_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("wsclf") / "clf"
    train(build_train_config(None, TINY + ["model.model=classifier-vitt", "schedule.iters=2", "seed=5"], data), run,
          progress=False)
    return run


def fresh_segmenter(num_classes: int = K, img_size: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    return SEGMENTER.build(ModelConfig(model="segmenter-vitt", num_classes=num_classes, img_size=img_size, kappa=8))


def test_loads_exactly_the_matching_tensors(classifier_run: Path) -> None:
    source = runs.load_weights(classifier_run / "model.safetensors")
    before = {k: v.clone() for k, v in fresh_segmenter().state_dict().items()}
    model = fresh_segmenter()
    rep = warm_start(model, classifier_run)
    after = model.state_dict()
    match = {k for k in after if k in source and source[k].shape == after[k].shape}
    assert match and all(k.startswith("backbone.vit.") for k in match)  # names line up by design
    assert sorted(rep.loaded) == sorted(match)
    assert sorted(rep.missing) == sorted(set(after) - match)
    assert sorted(rep.unexpected) == sorted(set(source) - set(after))
    assert rep.mismatched == [] and rep.resampled == []
    for k, v in after.items():
        assert torch.equal(v, source[k] if k in match else before[k]), k
    lines = rep.lines()
    assert lines[0].startswith(f"init from {classifier_run / 'model.safetensors'}: loaded {len(match)} of")
    assert f"unexpected (not in this model, ignored) {len(rep.unexpected)}: head." in lines[2]


def test_other_k_and_other_crop(classifier_run: Path) -> None:
    """A K=40 head into a K=30 model: listed and skipped; position embeddings of a 2x2 grid
    resampled to the 3x3 grid of a 48 px model (timm's resampling, as --backbone-weights)."""
    model = fresh_segmenter(num_classes=30, img_size=48)
    rep = warm_start(model, classifier_run)
    assert rep.resampled == ["backbone.vit.pos_embed"] and "backbone.vit.pos_embed" in rep.loaded
    assert model.state_dict()["backbone.vit.pos_embed"].shape == (1, 1 + 9, 192)
    # a segmenter run with K=40 into K=30: every class-sized tensor mismatches
    seg = fresh_segmenter()
    state = {k: v for k, v in seg.state_dict().items()}
    model = fresh_segmenter(num_classes=30)
    path = Path(classifier_run).parent / "seg40.pt"
    torch.save(state, path)
    rep = warm_start(model, path)
    names = {n for n, _, _ in rep.mismatched}
    assert {"head.cls_emb", "head.ml_fc.W", "head.ml_fc.b"} <= names and "head.mask_norm.weight" in rep.loaded
    assert ("head.cls_emb", (1, 40, 192), (1, 30, 192)) in rep.mismatched
    assert "shape mismatch (skipped)" in rep.lines()[3] and "[1, 40, 192] -> [1, 30, 192]" in " ".join(rep.lines())
    assert not names & set(rep.missing)


def test_plain_state_dicts_and_checkpoints(classifier_run: Path, tmp_path: Path) -> None:
    seg = fresh_segmenter()
    want = {k: v + 1 for k, v in seg.state_dict().items()}
    for i, wrap in enumerate((lambda s: s, lambda s: {"state_dict": s}, lambda s: {"model": {f"module.{k}": v for k, v in s.items()}})):
        path = tmp_path / f"w{i}.pth"
        torch.save(wrap(want), path)
        model = fresh_segmenter()
        rep = warm_start(model, path)
        assert rep.missing == [] and rep.unexpected == []
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    # a rankseg checkpoint (sealed): its model entry
    ckpt = tmp_path / "c.pt"
    runs.save_checkpoint(ckpt, {"model": want, "iteration": 1})
    model = fresh_segmenter()
    warm_start(model, ckpt)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_bad_sources_are_one_line(classifier_run: Path, tmp_path: Path) -> None:
    model = fresh_segmenter()
    garbage = tmp_path / "bad.pt"
    garbage.write_bytes(b"not a torch file")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 20)
    sealed = tmp_path / "sealed.pt"
    runs.save_checkpoint(sealed, {"model": model.state_dict(), "iteration": 1})
    raw = bytearray(sealed.read_bytes())
    raw[-100] ^= 0xFF  # one flipped byte inside the data
    sealed.write_bytes(bytes(raw))
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"foo.weight": torch.zeros(3)}, unrelated)
    timm_like = tmp_path / "vit.pth"
    torch.save({"blocks.0.norm1.weight": torch.zeros(3), "pos_embed": torch.zeros(1)}, timm_like)
    (tmp_path / "notrun").mkdir()
    weird = tmp_path / "w.ckpt"
    weird.write_bytes(b"x")
    cases = [(tmp_path / "missing.pt", "no such file"), (garbage, "is corrupt or not a weights file"),
             (bad_st, "is corrupt"), (sealed, "corrupt"), (tmp_path / "notrun", "not a rankseg run"),
             (unrelated, "no tensor fits this model"), (timm_like, "--backbone-weights"),
             (weird, "unknown weights format")]
    for source, fragment in cases:
        with pytest.raises(UserError, match=fragment) as exc:
            warm_start(model, source)
        assert "\n" not in str(exc.value)


def test_train_applies_it_once_and_resume_does_not(data: Path, classifier_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    seg = tmp_path / "seg"
    src = tmp_path / "src.safetensors"
    src.write_bytes((classifier_run / "model.safetensors").read_bytes())
    cfg = build_train_config(None, TINY + ["model.model=segmenter-vitt", "schedule.iters=2", "ckpt_every=1",
                                           f"init_from={src}", "optim.lr=1e-9", "schedule.min_lr=0"], data)
    train(cfg, seg, progress=False)
    assert runs.load_config(seg).init_from == str(src.resolve())  # recorded
    out = capsys.readouterr()
    assert "init from" in out.err + out.out and "loaded" in out.err + out.out
    # with a ~0 learning rate the backbone is still the source's
    w = runs.load_weights(seg / "model.safetensors")
    s = runs.load_weights(src)
    assert torch.allclose(w["backbone.vit.blocks.0.attn.qkv.weight"], s["backbone.vit.blocks.0.attn.qkv.weight"],
                          atol=1e-6)
    # resume: the source may be gone and must not be re-applied (the checkpoint wins)
    (seg / "model.safetensors").unlink()
    src.unlink()
    train(runs.load_config(seg), seg, resume=True, progress=False)
    out = capsys.readouterr()
    assert "init from" not in out.err + out.out


def test_cli_init_from(data: Path, classifier_run: Path, tmp_path: Path) -> None:
    args = ["train", "--data", str(data), "--model", "segmenter-vitt", "--iters", "1", "--set", "model.img_size=32",
            "--set", "data.num_workers=0", "--set", "data.val_split="]
    res = CliRunner().invoke(cli_app(), args + ["--out", str(tmp_path / "a"), "--init-from", str(classifier_run)])
    assert res.exit_code == 0, res.output
    assert "init from" in res.output and "shape mismatch (skipped) 0" in res.output
    other = tmp_path / "k48"
    make_synthetic(other, num_classes=48, images=4, val_images=2, size=32, seed=0)
    res = CliRunner().invoke(cli_app(), ["train", "--data", str(other), "--model", "segmenter-vitt", "--iters", "1",
                                         "--set", "model.img_size=32", "--set", "data.num_workers=0",
                                         "--set", "data.val_split=", "--out", str(tmp_path / "b"),
                                         "--init-from", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output  # K=40 -> K=48: skipped and said so, training goes on
    assert "shape mismatch (skipped)" in res.output and "head.cls_emb [1, 40, 192] -> [1, 48, 192]" in " ".join(
        res.output.split())
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08" + b"\x00" * 7 + b"{broken")
    for source, fragment in ((tmp_path / "nope", "no such file or run directory"),
                             (data, "not a rankseg run"), (corrupt, "is corrupt")):
        res = CliRunner().invoke(cli_app(), args + ["--out", str(tmp_path / "c"), "--init-from", str(source)])
        assert_one_line_error(res, fragment)
    assert not (tmp_path / "c" / "model.safetensors").exists()
