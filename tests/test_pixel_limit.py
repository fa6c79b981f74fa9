"""The pixel limit (codec.MAX_PIXELS): images and masks whose header claims more pixels are refused
before decoding, as a per-sample error in converters and a one-line error in `predict`.

The "bombs" are real small PNG / JPEG files whose header is patched to claim a huge size
(20000 x 20000 = 4e8 pixels: over our limit, under OpenCV's own 2^30, so without the check
OpenCV would allocate 1.2 GB and try to decode them).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import assert_one_line_error, make_synthetic
from PIL import Image
from typer.testing import CliRunner
from video_lvis_trees import lvis_tree, read_samples, write_docs

from rankseg_core.convert.ade20k_full import decode_seg
from rankseg_core.convert.coco_lvis import prepare_coco_lvis
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.source_io import decode_jpeg, decode_mask
from rankseg_core.errors import SampleError
from rankseg_core.shards.codec import (
    MAX_PIXELS,
    check_pixel_limit,
    decode_image,
    decode_label,
    encode_label,
    header_size,
)

BIG = 20000  # 20000^2 = 4e8 > MAX_PIXELS = 2^28 (and < OpenCV's 2^30)


def png_claiming(h: int, w: int, image: np.ndarray | None = None) -> bytes:
    """A real PNG whose IHDR (with a valid CRC) says h x w."""
    ok, buf = cv2.imencode(".png", np.zeros((8, 8), np.uint8) if image is None else image)
    data = bytearray(buf.tobytes())
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(h: int, w: int) -> bytes:
    """A real baseline JPEG whose SOF0 segment says h x w."""
    ok, buf = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))
    data = bytearray(buf.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def test_header_size_matches_pil() -> None:
    rng = np.random.default_rng(0)
    samples = []
    for h, w in ((37, 53), (1, 300), (480, 640)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        samples.append(cv2.imencode(".png", img)[1].tobytes())
        samples.append(cv2.imencode(".png", img[..., 0].astype(np.uint16) * 257)[1].tobytes())
        samples.append(cv2.imencode(".jpg", img)[1].tobytes())
        samples.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes())
        buf = io.BytesIO()  # EXIF (APP1) and a palette PNG, written by PIL
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(img).save(buf, "JPEG", exif=exif.tobytes())
        samples.append(buf.getvalue())
        buf = io.BytesIO()
        Image.fromarray(img[..., 0]).convert("P").save(buf, "PNG")
        samples.append(buf.getvalue())
    for data in samples:
        with Image.open(io.BytesIO(data)) as im:
            assert header_size(data) == (im.height, im.width)
        assert header_size(np.frombuffer(data, np.uint8)) == header_size(data)
    assert header_size(b"BM not an image") is None and header_size(b"\xff\xd8\xff") is None
    assert header_size(png_claiming(BIG, BIG + 1)) == (BIG, BIG + 1)
    assert header_size(jpeg_claiming(BIG, BIG + 1)) == (BIG, BIG + 1)


@pytest.mark.parametrize("bomb", [png_claiming(BIG, BIG), jpeg_claiming(BIG, BIG)], ids=["png", "jpeg"])
def test_decoders_refuse_bombs(bomb: bytes) -> None:
    with pytest.raises(ValueError, match="over rankseg's limit of 268,435,456"):
        decode_image(bomb)
    with pytest.raises(SampleError, match=r"x\.img: image is 20000x20000 .* over rankseg's limit"):
        decode_jpeg(bomb, "x.img")
    # a header exactly at the limit passes (not decoded here: OpenCV would fill 16384^2 pixels)
    side = int(MAX_PIXELS ** 0.5)
    at_limit = png_claiming(side, side) if bomb[:4] == b"\x89PNG" else jpeg_claiming(side, side)
    assert check_pixel_limit(at_limit) == (side, side)
    with pytest.raises(ValueError):
        check_pixel_limit(png_claiming(side, side + 1) if bomb[:4] == b"\x89PNG" else jpeg_claiming(side, side + 1))


def test_masks_and_labels_refuse_bombs() -> None:
    bomb = png_claiming(BIG, BIG)
    with pytest.raises(SampleError, match=r"m\.png: mask is 20000x20000"):
        decode_mask(bomb, "m.png")
    with pytest.raises(SampleError, match=r"s\.png: segmentation mask is 20000x20000"):
        decode_seg(bomb, "s.png")
    with pytest.raises(ValueError, match="label is 20000x20000"):
        decode_label(bomb)
    label = np.arange(12, dtype=np.uint16).reshape(3, 4)
    assert np.array_equal(decode_label(encode_label(label)), label)  # real labels still decode


def test_other_formats_are_checked_through_pil() -> None:
    img = np.zeros((5, 7, 3), np.uint8)
    bmp = bytearray(cv2.imencode(".bmp", img)[1].tobytes())
    assert decode_image(bytes(bmp)).shape == (5, 7, 3)
    bmp[18:26] = struct.pack("<ii", BIG, BIG)  # BITMAPINFOHEADER width, height
    with pytest.raises(ValueError, match="limit"):
        decode_image(bytes(bmp))


def test_coco_lvis_skips_a_bomb_image(tmp_path: Path) -> None:
    coco, lvis, stuff = lvis_tree(tmp_path)
    lj, sj = write_docs(tmp_path, lvis, stuff)
    (coco / "val2017" / "000000000002.jpg").write_bytes(jpeg_claiming(BIG, BIG))
    out = tmp_path / "out"
    index = prepare_coco_lvis(coco, [lj], [sj], out, opts=ConvertOptions(workers=0, on_error="skip"))
    assert index["splits"]["val"]["num_skipped"] == 1 and list(read_samples(out, "val")) == ["000000000001"]
    reason = json.loads((out / "skipped.jsonl").read_text())["reason"]
    assert "000000000002.jpg: image is 20000x20000" in reason

    from rankseg_cli import prepare_video_lvis  # noqa: F401  (registers the commands)
    from rankseg_cli.app import app

    res = CliRunner().invoke(app, ["prepare", "coco-lvis", "--coco-root", str(coco), "--lvis-json", str(lj),
                                   "--stuff-json", str(sj), "--out", str(tmp_path / "o2"), "--workers", "0"])
    assert_one_line_error(res, "000000000002.jpg: image is 20000x20000", "limit")


def test_predict_refuses_a_bomb(tmp_path: Path) -> None:
    from rankseg_cli.app import app
    from rankseg_core.engine.configure import build_train_config
    from rankseg_core.engine.train import train

    make_synthetic(tmp_path / "data", num_classes=40, images=4, val_images=2, size=32, seed=0)
    cfg = build_train_config(None, ["model.model=segmenter-vitt", "model.img_size=32", "model.kappa=3",
                                    "schedule.iters=1", "schedule.batch_size=2", "data.num_workers=0",
                                    "eval.num_workers=0", "eval.short_side=32", "eval.batch_size=2"],
                             tmp_path / "data")
    train(cfg, tmp_path / "run", progress=False)
    for name, data in (("bomb.png", png_claiming(60000, 60000)), ("bomb.jpg", jpeg_claiming(BIG, BIG))):
        (tmp_path / name).write_bytes(data)
        res = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), str(tmp_path / name),
                                       "--out", str(tmp_path / "pred")])
        assert_one_line_error(res, name, "over rankseg's limit of 268,435,456")
