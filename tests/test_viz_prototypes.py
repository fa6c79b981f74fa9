"""`rankseg viz prototypes` (issue 20): the prototype each pixel took, against an independent
computation from the model's embeddings and prototype buffer; the figure, its numbers, its
layout at real sizes and names, and the command's refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, make_synthetic, tiny_run
from PIL import Image
from typer.testing import CliRunner

from rankseg_cli.viz_cmds import viz_app
from rankseg_core.engine import runs
from rankseg_core.engine.configure import build_train_config
from rankseg_core.families import family_of
from rankseg_core.model.protoseg import ProtoSegHead
from rankseg_core.utils.palette import make_palette, min_colour_distance
from rankseg_core.viz import prototypes as P
from rankseg_core.viz.common import load_viz_run

K = 40  # the synthetic data's smallest vocabulary
M = 3
DPI = 120  # plotting.save_figure's default


def invoke(*args: object):
    return CliRunner().invoke(viz_app, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("vizproto") / "data", images=6, val_images=2, num_classes=K,
                          size=32)


@pytest.fixture(scope="module")
def proto_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A protoseg run trained 2 iterations (momentum 0.5: the prototypes moved off their init)."""
    from rankseg_core.engine.train import train

    sets = tiny_run(kappa=3) + ["model.head=protoseg", f"model.protoseg.prototypes={M}", "model.protoseg.momentum=0.5",
                                "schedule.iters=2", "device=cpu", "eval.every=0", "data.val_split="]
    run = tmp_path_factory.mktemp("runs") / "protoseg"
    train(build_train_config(None, sets, data), run, progress=False)
    return run


def saved_run(run_dir: Path, data: Path, *sets: str) -> Path:
    """An untrained run as `rankseg train` leaves it (config + weights), without training."""
    cfg = build_train_config(None, [*tiny_run(kappa=3), *sets], data)
    torch.manual_seed(0)
    runs.save_config(run_dir, cfg)
    runs.save_weights(runs.run_paths(run_dir).weights, family_of(cfg.model.model).build(cfg.model))
    return run_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 40 x 56 landscape PNG (test size 32 x 45: a padded 2 x 3 grid) and a 50 x 30 portrait JPEG."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    a, b = d / "land.png", d / "port.jpg"
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(a)
    Image.fromarray(rng.integers(0, 255, (50, 30, 3), dtype=np.uint8)).save(b)
    return [a, b]


# ---------------------------------------------------------------------------------------
# The assignment against an independent computation


def reference(run_dir: Path, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ProtoSeg by hand: embeddings x prototype buffer (einsum), max over each class's M
    prototypes, LayerNorm(K) with the head's affine, argmax -> (class, prototype) on the grid;
    the prediction: those logits bilinearly resized to the unpadded test size, then to the
    image (the official whole-image pass), argmax."""
    run = load_viz_run(run_dir, "cpu")
    model, head = run.model, run.model.head
    assert isinstance(head, ProtoSegHead)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    x = torch.from_numpy(P.transform_of(run)(rgb))[None]
    h, w = x.shape[-2:]
    with torch.no_grad():
        emb = head.embed(model.forward_features(F.pad(x, (0, -w % 16, 0, -h % 16))))  # 1 x p x D
        cos = torch.einsum("bpd,kmd->bpkm", emb, head.prototypes)  # 1 x p x K x M
        logits = F.layer_norm(cos.amax(-1), (K,), head.mask_norm.weight, head.mask_norm.bias, 1e-5)
    cls = logits.argmax(-1)[0]  # p
    proto = cos[0, torch.arange(len(cls)), cls].argmax(-1)
    gh, gw = -(-h // 16), -(-w // 16)
    maps = logits[0].t().reshape(1, K, gh, gw)
    maps = F.interpolate(F.interpolate(maps, size=(h, w), mode="bilinear"), size=rgb.shape[:2], mode="bilinear")
    return cls.reshape(gh, gw).numpy(), proto.reshape(gh, gw).numpy(), maps[0].argmax(0).numpy()


def test_assignment_is_the_nearest_prototype_of_the_predicted_class(proto_run: Path, images: list[Path]) -> None:
    run = load_viz_run(proto_run, "cpu")
    before = run.model.head.prototypes
    assert not torch.allclose(before.norm(dim=-1), torch.zeros(K, M))
    for path in images:
        item = P.assign_image(run, np.asarray(Image.open(path).convert("RGB")), path)
        cls, proto, pred = reference(proto_run, path)
        np.testing.assert_array_equal(item.grid_class, cls)
        np.testing.assert_array_equal(item.grid_proto, proto)
        np.testing.assert_array_equal(item.pred, pred)
        assert item.pred.shape == item.image.shape[:2]
        # The display map: the grid stretched over the image, as torch's nearest interpolation.
        up = F.interpolate(torch.from_numpy(proto)[None, None].float(), size=item.size, mode="nearest")
        np.testing.assert_array_equal(item.prototype_map(), up[0, 0].long().numpy())
    assert item.grid_proto.shape == (4, 2)  # 50 x 30 -> test size 53 x 32 -> padded 64 x 32


def test_rankproto_maps_ranks_back_to_class_ids(data: Path, tmp_path: Path, images: list[Path]) -> None:
    run_dir = saved_run(tmp_path / "rankproto", data, "model.head=rankproto", "model.protoseg.prototypes=2")
    run = load_viz_run(run_dir, "cpu")
    rgb = np.asarray(Image.open(images[0]).convert("RGB"))
    item = P.assign_image(run, rgb, images[0])
    x = torch.from_numpy(P.transform_of(run)(rgb))[None]
    with torch.no_grad():
        out = run.model(F.pad(x, (0, -x.shape[-1] % 16, 0, -x.shape[-2] % 16)))
    assert out.topk_index is not None and out.embeddings is not None and out.topk_index.shape == (1, 3)
    ranked = out.mask_logits[0].flatten(1).argmax(0)  # p: a rank in 0..kappa-1
    cls = out.topk_index[0, ranked]
    buffer = run.model.head.prototypes  # K x M x D, rows by class id
    proto = torch.einsum("pd,pmd->pm", out.embeddings[0], buffer[cls]).argmax(-1)
    np.testing.assert_array_equal(item.grid_class.ravel(), cls.numpy())
    np.testing.assert_array_equal(item.grid_proto.ravel(), proto.numpy())


CONV_SETS = ["model.convseg.channels=16", "model.convseg.aux_channels=8", "model.convseg.ml_dim=16",
             "model.convseg.aspp_dilations=1,2", "model.convseg.pool_scales=1,2", "model.protoseg.prototypes=2"]


@pytest.mark.parametrize("head", ["protoseg", "rankproto"])
def test_conv_prototype_runs_match_their_embeddings_and_the_engine(head: str, data: Path, tmp_path: Path,
                                                                   images: list[Path]) -> None:
    """DeepLabv3 (decoder grid 1/8): the assignment from the model's embeddings x buffer, and the
    prediction equal to the engine's own whole-image pass (`Family.predict`, dense over K)."""
    from rankseg_core.families.base import InferenceProtocol
    from rankseg_core.model.selection import Selection

    run_dir = saved_run(tmp_path / head, data, "model.model=deeplabv3-r18", f"model.head={head}", *CONV_SETS)
    run = load_viz_run(run_dir, "cpu")
    rgb = np.asarray(Image.open(images[0]).convert("RGB"))
    item = P.assign_image(run, rgb, images[0])
    x = torch.from_numpy(P.transform_of(run)(rgb))[None]
    with torch.no_grad():
        out = run.model(x)
        res = family_of("deeplabv3-r18").predict(run.model, run.cfg, x, [rgb.shape[:2]],
                                                 InferenceProtocol("whole", (1.0,), False), Selection())
    ch = out.mask_logits[0].flatten(1).argmax(0)
    cls = ch if out.topk_index is None else out.topk_index[0, ch]
    proto = torch.einsum("pd,pmd->pm", out.embeddings[0], run.model.classifier.prototypes[cls]).argmax(-1)
    assert item.grid_class.shape == (4, 6)  # 32 x 45 at the test size, 1/8
    np.testing.assert_array_equal(item.grid_class.ravel(), cls.numpy())
    np.testing.assert_array_equal(item.grid_proto.ravel(), proto.numpy())
    np.testing.assert_array_equal(item.pred, res.semantic[0].numpy())


@pytest.mark.parametrize("ranked", [False, True])
@pytest.mark.parametrize("size", [(100, 140), (31, 23), (4, 3)], ids=["up", "down", "tiny"])
def test_one_pass_prediction_is_the_dense_argmax(ranked: bool, size: tuple[int, int],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the dense official chain over all K (bilinear to the test size, then to the
    image; argmax), channels resized a few at a time; ranked: kappa channels in rank order with
    a padded (invalid) last one, as rankproto outputs. The grid: regions dominated by one class
    over noise (as a trained model) plus a class that is the top-1 of no cell but wins between
    two (the elimination must keep it)."""
    from rankseg_core.model.protoseg import ProtoSegOutput

    monkeypatch.setattr(P, "CHUNK_CHANNELS", 3)
    g = torch.Generator().manual_seed(0)
    k, test = 12, (90, 125)
    c = 5 if ranked else k
    region = torch.tensor([0, 1, 3, 2])[torch.arange(6)[:, None] // 3 * 2 + torch.arange(8)[None] // 4]
    logits = torch.randn(1, c, 6, 8, generator=g) * 0.3 + 2 * F.one_hot(region, c).permute(2, 0, 1)
    logits[0, :, 0, 3:5] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.9, 0.9]])[:c] \
        if ranked else torch.cat([torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.zeros(c - 3, 2),
                                  torch.tensor([[0.9, 0.9]])])
    index = torch.tensor([[7, 2, 11, 4, 0]]) if ranked else None
    valid = torch.tensor([[True, True, True, True, True]]) if ranked else None
    if ranked:  # one more, invalid, column: rankproto pads kappa with FILL_LOGIT
        logits = torch.cat([logits, torch.full((1, 1, 6, 8), -100.0)], 1)
        index = torch.cat([index, torch.tensor([[5]])], 1)
        valid = torch.cat([valid, torch.tensor([[False]])], 1)
    out = ProtoSegOutput(mask_logits=logits, topk_index=index, valid=valid)
    dense = torch.full((1, k, 6, 8), -100.0)  # unselected classes: the official fill
    if ranked:
        dense[0, index[0, :5]] = logits[0, :5]
    else:
        dense = logits
    up = F.interpolate(F.interpolate(dense, size=test, mode="bilinear"), size=size, mode="bilinear")
    want = up[0].argmax(0)
    top_class = (index[0, :5] if ranked else torch.arange(k))[-1 if ranked else k - 1]
    assert not bool((dense[0].argmax(0) == top_class).any())  # the top-1 of no cell ...
    if min(size) > 10:
        assert len(want.unique()) > 3 and bool((want == top_class).any())  # ... wins between two cells
    torch.testing.assert_close(P.predict_one_pass(out, k, test, size), want, rtol=0, atol=0)
    if not ranked:  # the elimination skipped the noise channels rather than resizing all K
        calls: list[int] = []
        real = P._resized_argmax
        monkeypatch.setattr(P, "_resized_argmax", lambda grid, ch, *a: calls.append(len(ch)) or real(grid, ch, *a))
        P.predict_one_pass(out, k, test, size)
        assert sum(calls) < k


def test_one_pass_prediction_of_an_image_smaller_than_its_grid() -> None:
    # A 1 x 1 image of a 1 x 8 grid: its pixel mixes cells 3 and 4 (the centre), where class 2,
    # the top-1 of no cell, wins; the stretched nearest map would have looked at cell 0.
    from rankseg_core.model.protoseg import ProtoSegOutput

    grid = torch.zeros(1, 4, 1, 8)
    grid[0, 0, 0, 3], grid[0, 1, 0, 4], grid[0, 2, 0, 3:5] = 1.0, 1.0, 0.9
    grid[0, 3] = 0.5
    grid[0, 3, 0, 3:5] = 0.0
    want = F.interpolate(F.interpolate(grid, size=(16, 128), mode="bilinear"), size=(1, 1), mode="bilinear")
    assert want[0].argmax(0).item() == 2
    assert P.predict_one_pass(ProtoSegOutput(mask_logits=grid), 4, (16, 128), (1, 1)).item() == 2


def test_outlines_lie_where_the_upsampled_classes_change() -> None:
    # Hand-built: a 2 x 3 grid over 4 x 6 pixels (cells of 2 x 2 pixels); pixel (y, x) spans x +- 0.5.
    grid = np.array([[0, 0, 1], [2, 2, 1]])
    up = P.upsample_nearest(grid, (4, 6))
    np.testing.assert_array_equal(up, np.kron(grid, np.ones((2, 2), np.int64)))
    segs = P.outline_segments(up)
    assert sorted(tuple(map(tuple, s)) for s in segs) == sorted([
        ((3.5, -0.5), (3.5, 3.5)),  # | between pixel columns 3 and 4: classes 0|1 and 2|1, one straight run
        ((-0.5, 1.5), (3.5, 1.5))])  # - between pixel rows 1 and 2: 0 over 2 (1 over 1 is no edge)
    # Any grid, any size (also an image smaller than its grid): the unit pixel edges the
    # segments cover are exactly those between two pixels of different classes.
    rng = np.random.default_rng(0)
    for size in [(7, 11), (40, 56), (5, 3)]:
        up = P.upsample_nearest(rng.integers(0, 3, (3, 4)), size)
        want = {("v", int(y), int(x)) for y, x in zip(*np.nonzero(up[:, 1:] != up[:, :-1]))} | \
               {("h", int(y), int(x)) for y, x in zip(*np.nonzero(up[1:] != up[:-1]))}
        got = set()
        for (x0, y0), (x1, y1) in P.outline_segments(up):
            if x0 == x1:  # vertical: between pixel columns x0 - 0.5 and x0 + 0.5
                got |= {("v", y, int(x0 - 0.5)) for y in range(int(y0 + 0.5), int(y1 + 0.5))}
            else:
                got |= {("h", int(y0 - 0.5), x) for x in range(int(x0 + 0.5), int(x1 + 0.5))}
        assert got == want, size


def test_prototype_hues_are_distinct() -> None:
    for m in (1, 3, 10, 20, 32):
        hues = P.prototype_colours(m)
        assert hues.shape == (m, 3) and len({tuple(c) for c in hues}) == m
    assert min_colour_distance(P.prototype_colours(10)) > 20  # tab10: every pair tells apart at a glance


# ---------------------------------------------------------------------------------------
# The command


@pytest.mark.parametrize("suffix", ["png", "svg", "pdf"])
def test_command_writes_the_figure_and_its_numbers(proto_run: Path, images: list[Path], tmp_path: Path,
                                                  suffix: str) -> None:
    out = tmp_path / "fig" / f"protos.{suffix}"
    res = invoke("prototypes", proto_run, *images, "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert out.is_file() and out.stat().st_size > 1000
    head = out.read_bytes()[:5]
    assert {"png": head[1:4] == b"PNG", "pdf": head == b"%PDF-", "svg": b"<svg" in out.read_bytes()[:400]}[suffix]
    if suffix == "png":
        run = load_viz_run(proto_run, "cpu")
        items = [P.assign_image(run, np.asarray(Image.open(p).convert("RGB")), p) for p in images]
        fw, fh = P.figure_size(items, K)
        with Image.open(out) as im:
            w, h = im.size
            assert np.asarray(im.convert("RGB")).std() > 10
        assert 0.8 * fw * DPI <= w <= 1.1 * fw * DPI and fh * DPI <= h <= (fh + 0.8) * DPI  # + the hue key
        rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
        for it in items:  # every grid cell counted once, under its class and prototype
            mine = [r for r in rows if r["image"] == str(it.path)]
            counts = np.zeros((K, M), np.int64)
            for r in mine:
                counts[int(r["class_id"]), int(r["prototype"])] += int(r["patches"])
            ref = np.zeros((K, M), np.int64)
            np.add.at(ref, (it.grid_class.ravel(), it.grid_proto.ravel()), 1)
            np.testing.assert_array_equal(counts, ref)
        js = json.loads(out.with_suffix(".json").read_text())
        assert js["head"] == "protoseg" and js["prototypes"] == M and len(js["images"]) == 2
        assert js["images"][1]["grid"] == [4, 2] and js["images"][1]["height"] == 50
        assert sum(c["pixel_share"] for c in js["images"][0]["classes"]) == pytest.approx(1.0)
    assert "prototypes used per predicted class" in res.output


def test_refusals_are_one_line_errors(proto_run: Path, data: Path, images: list[Path], tmp_path: Path) -> None:
    base = saved_run(tmp_path / "baseline", data, "model.head=segmenter")
    out = tmp_path / "f.png"
    assert_one_line_error(invoke("prototypes", base, images[0], "--out", out, "--device", "cpu"),
                          str(base), "has no prototypes", "--head protoseg or rankproto")
    assert_one_line_error(invoke("prototypes", proto_run, tmp_path / "missing.jpg", "--out", out),
                          "missing.jpg", "no such file")
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert_one_line_error(invoke("prototypes", proto_run, images[0], bad, "--out", out, "--device", "cpu"),
                          "corrupt.jpg", "cannot decode image")
    victim = tmp_path / "victim.png"
    victim.write_bytes(images[0].read_bytes())
    before = victim.read_bytes()
    assert_one_line_error(invoke("prototypes", proto_run, victim, "--out", victim), "would overwrite the input")
    csv_input = tmp_path / "v.csv"  # the numbers written next to the figure are outputs too
    csv_input.write_bytes(before)
    assert_one_line_error(invoke("prototypes", proto_run, csv_input, "--out", tmp_path / "v.png"),
                          "v.csv would overwrite the input")
    assert_one_line_error(invoke("prototypes", proto_run, images[0], "--out", tmp_path / "f.jpg"),
                          "unknown figure format .jpg")
    assert_one_line_error(invoke("prototypes", tmp_path / "norun", images[0], "--out", out), "no such run directory")
    beit = saved_run(tmp_path / "beit", data, "model.model=upernet-beitt", "model.head=protoseg", *CONV_SETS)
    assert_one_line_error(invoke("prototypes", beit, images[0], "--out", out, "--device", "cpu"),  # 45 x 32 at test size
                          "upernet-beitt takes inputs of at most 32x32", "sliding windows", "45x32")
    many = tmp_path / "many"
    many.mkdir()
    for i in range(P.MAX_IMAGES + 1):
        (many / f"{i:02d}.png").write_bytes(before)
    assert_one_line_error(invoke("prototypes", proto_run, many, "--out", out), f"at most {P.MAX_IMAGES} rows")
    assert victim.read_bytes() == before and not out.exists()


# ---------------------------------------------------------------------------------------
# Layout at real sizes with the longest real class names


def test_layout_at_real_sizes_with_ade20k_full_names() -> None:
    from test_figure_layout import ADE, layout_problems, longest

    k = len(ADE)
    rng = np.random.default_rng(0)
    items = []
    for i, (h, w) in enumerate([(512, 683), (683, 512), (1650, 2386)]):
        gh, gw = -(-h // 16), -(-w // 16)
        ids = longest(ADE, 16)[i::2] if i < 2 else longest(ADE, 3)
        grid = ids[(np.arange(gh)[:, None] * len(ids) // gh + np.arange(gw)[None] * 2 // gw) % len(ids)]
        item = P.PrototypeImage(Path(f"ADE_val_{i:08d}_with_a_rather_long_file_name.jpg"),
                                rng.integers(0, 255, (h, w, 3), dtype=np.uint8), P.upsample_nearest(grid, (h, w)),
                                grid, rng.integers(0, 10, (gh, gw)))
        items.append(item)
    fig = P.draw_prototypes(items, ADE, make_palette(k), 10,
                            "protoseg-ade20k-full-vitb-160k: protoseg M=10, K=847")
    assert layout_problems(fig) == []
