"""COCO+LVIS converter against independent references (lvis-api / pycocotools per-annotation loops)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error
from PIL import Image
from typer.testing import CliRunner
from video_lvis_trees import coco_image, read_samples, rect, stuff_doc, v1_categories, write_jpeg, write_json

from rankseg_core.convert.coco_lvis import (
    essnet_mapping,
    json_vocabulary,
    prepare_coco_lvis,
    split_of,
    stuff_lut,
    v1_vocabulary,
)
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.errors import UserError
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.verify import verify_shards
from rankseg_core.utils.resources import load_json as load_dataset_json

# The spec's merges (docs/datasets.md, ESSNet): stuff id -> COCO+LVIS value.
MERGES = {92: 50, 93: 110, 98: 181, 108: 346, 109: 350, 137: 713, 141: 804, 153: 904, 165: 1050,
          168: 1108}
OPTS = ConvertOptions(workers=0)


def intended_value(k: int) -> int:
    """Spec: the 10 merges; the other 81 stuff classes -> 1204.. in ascending id; 183 -> 0."""
    if k in MERGES:
        return MERGES[k]
    if k == 183:
        return 0
    return 1204 + [s for s in range(92, 183) if s not in MERGES].index(k)


def essnet_inplace(stuff: np.ndarray) -> np.ndarray:
    """ESSNet's literal loop `for k, v in coco2lvis.items(): cmask[cmask == k] = v` (on int64)."""
    out = stuff.astype(np.int64).copy()
    for k, v in load_dataset_json("coco_lvis/essnet_coco2lvis.json")["mapping"].items():
        out[out == int(k)] = v
    return out


def reference(lvis_json: Path, stuff_jsons: list[Path], lvis_value, stuff_map,
              only: set[int] | None = None) -> dict[int, np.ndarray]:
    """Image id -> H x W stored values, by a plain per-annotation first-wins loop (lvis-api masks)."""
    from lvis import LVIS  # lazily: it configures logging and imports pyplot
    from pycocotools.coco import COCO

    lv = LVIS(str(lvis_json))
    stuffs = [COCO(str(p)) for p in stuff_jsons]
    out = {}
    for iid in lv.get_img_ids():
        if only is not None and iid not in only:
            continue
        img = lv.load_imgs([iid])[0]
        val = np.zeros((img["height"], img["width"]), np.int64)
        for ann in lv.load_anns(lv.get_ann_ids(img_ids=[iid])):
            m = lv.ann_to_mask(ann).astype(bool)
            val[m & (val == 0)] = lvis_value(ann["category_id"])
        stuff = np.zeros_like(val)
        for coco in stuffs:
            if iid in coco.imgs:
                for ann in coco.loadAnns(coco.getAnnIds(imgIds=[iid])):
                    m = coco.annToMask(ann).astype(bool)
                    stuff[m & (stuff == 0)] = ann["category_id"]
        out[iid] = np.where(val == 0, stuff_map(stuff), val)
    return out


def to_train(values: np.ndarray) -> np.ndarray:
    return np.where(values == 0, IGNORE, values - 1)


def by_id(samples: dict) -> dict[int, dict]:
    return {int(k): v for k, v in samples.items()}


# --------------------------------------------------------------------------- tables and rules


def test_tables_and_stuff_luts() -> None:
    mapping = essnet_mapping()
    assert len(mapping) == 93 and [k for k, _ in mapping][:3] == [92, 93, 94]
    intended = stuff_lut(mapping)
    for k in range(92, 184):
        assert intended[k] == intended_value(k), k
    assert intended[255] == 0
    chained = stuff_lut(mapping, chained=True)
    literal = essnet_inplace(np.arange(256))
    known = [k for k, _ in mapping]
    assert np.array_equal(chained[known], literal[known])
    diff = np.nonzero(chained != intended)[0].tolist()
    assert diff == [93, 98] and chained[93] == 1217 and chained[98] == 1283
    vocab = v1_vocabulary()
    assert vocab.num_classes == 1284 and vocab.names[49] == "banner" and vocab.names[1203] == "branch"
    vspw = load_dataset_json("vspw/classes.json")
    assert len(vspw["classes"]) == 124 and "others" not in {c["name"] for c in vspw["classes"]}
    assert all("source" in load_dataset_json(f) for f in (
        "coco_lvis/classes.json", "coco_lvis/essnet_coco2lvis.json", "vspw/classes.json",
        "youtube_vis_2019/classes.json"))


def test_synset_rule_on_v1_gives_essnet_table() -> None:
    """The rule used for non-v1 vocabularies reproduces ESSNet's table when given v1."""
    vocab = json_vocabulary(v1_categories(), Path("lvis_v1_val.json"))
    assert vocab.stuff_values == essnet_mapping()
    assert vocab.names == v1_vocabulary().names


def test_split_names() -> None:
    assert split_of(Path("lvis_v1_train.json")) == "train"
    assert split_of(Path("lvis_v1_val.json")) == "val"
    assert split_of(Path("lvis_val_100.json")) == "val"
    assert split_of(Path("lvis_v0.5_train.json")) == "train"
    with pytest.raises(UserError, match="--split"):
        split_of(Path("my_subset.json"))


# --------------------------------------------------------------------------- generated trees


def merge_tree(root: Path) -> tuple[Path, Path, Path]:
    """Image 1: one 2-px column per stuff id 92..183, LVIS empty; image 2 (train2017 folder):
    LVIS annotations over part of a stuff field. Returns (coco root, LVIS JSON, stuff JSON)."""
    coco = root / "coco"
    h, w = 6, 2 * 92
    write_jpeg(coco / "val2017" / "000000000001.jpg", h, w)
    write_jpeg(coco / "train2017" / "000000000002.jpg", 20, 24, seed=1)
    imgs = [coco_image(1, h, w, "val2017"), coco_image(2, 20, 24, "train2017")]
    stuff = []
    for k in range(92, 184):
        m = np.zeros((h, w), bool)
        m[:, 2 * (k - 92):2 * (k - 92) + 2] = True
        stuff.append((1, k, m))
    field = np.zeros((20, 24), bool)
    field[:, 12:] = True
    stuff += [(2, 165, ~field), (2, 93, field)]
    anns = [{"id": 1, "image_id": 2, "category_id": 1000, "segmentation": [rect(2, 2, 16, 10)]},
            {"id": 2, "image_id": 2, "category_id": 7, "segmentation": [rect(8, 6, 20, 16)]}]
    lj = write_json(root / "lvis_v1_val.json", {"images": imgs, "annotations": anns,
                                                "categories": v1_categories()})
    sj = write_json(root / "stuff_val2017.json", stuff_doc(imgs, stuff))
    return coco, lj, sj


def test_merges_and_essnet_compat(tmp_path: Path) -> None:
    coco, lj, sj = merge_tree(tmp_path)
    out, out_c = tmp_path / "out", tmp_path / "out_compat"
    prepare_coco_lvis(coco, [lj], [sj], out, opts=OPTS)
    prepare_coco_lvis(coco, [lj], [sj], out_c, essnet_compat=True, opts=OPTS)
    assert list(verify_shards(out)) == [] and list(verify_shards(out_c)) == []
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["num_classes"] == 1284 and meta["options"]["essnet_compat"] is False
    s, sc = by_id(read_samples(out, "val")), by_id(read_samples(out_c, "val"))

    # image 1: column block j holds stuff id 92 + j
    cols = np.repeat(np.arange(92, 184), 2)
    expect = to_train(np.array([intended_value(k) for k in cols]))
    assert np.array_equal(s[1]["label"], np.broadcast_to(expect, (6, 184)))
    for k, v in MERGES.items():  # the ten merges land on the same-named LVIS class
        assert meta["class_names"][v - 1] == meta["class_names"][intended_value(k) - 1]
    compat = to_train(essnet_inplace(cols))
    assert np.array_equal(sc[1]["label"][0], compat)
    differs = sorted(set(cols[s[1]["label"][0] != sc[1]["label"][0]].tolist()))
    assert differs == [93, 98]
    assert sc[1]["label"][0, 2] == 1216 and sc[1]["label"][0, 12] == 1282  # blanket, cabinet

    # both against the lvis-api / pycocotools reference
    ref = reference(lj, [sj], int, lambda a: np.vectorize(intended_value)(a))
    ref_c = reference(lj, [sj], int, essnet_inplace)
    for iid in (1, 2):
        assert np.array_equal(s[iid]["label"], to_train(ref[iid])), iid
        assert np.array_equal(sc[iid]["label"], to_train(ref_c[iid])), iid
    # image 2: stuff only where LVIS left pixels empty
    lab = s[2]["label"]
    assert lab[4, 4] == 999 and lab[12, 14] == 6 and lab[8, 10] == 999  # first LVIS wins
    assert lab[0, 0] == 1049 and lab[0, 20] == 109  # table, blanket stuff
    assert s[2]["image"] == (coco / "train2017" / "000000000002.jpg").read_bytes()
    assert s[2]["classes"] == sorted(set(lab.ravel().tolist()) - {IGNORE})


def test_first_wins_overlaps_and_multipart(tmp_path: Path) -> None:
    coco = tmp_path / "coco"
    rng = np.random.default_rng(3)
    imgs, anns, stuff = [], [], []
    for iid in range(1, 5):
        h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
        write_jpeg(coco / "val2017" / f"{iid:012d}.jpg", h, w, seed=iid)
        imgs.append(coco_image(iid, h, w, "val2017"))
        for _ in range(6):  # random overlapping triangles / multi-part polygons
            parts = [rng.uniform(-3, max(h, w) + 3, 6).round(2).tolist()
                     for _ in range(int(rng.integers(1, 3)))]
            anns.append({"id": len(anns) + 1, "image_id": iid, "segmentation": parts,
                         "category_id": int(rng.choice([1, 50, 256, 511, 1203]))})
        m = rng.random((h, w)) < 0.5
        stuff += [(iid, 157, m), (iid, 183, ~m)]
    lj = write_json(tmp_path / "lvis_v1_val.json", {"images": imgs, "annotations": anns,
                                                     "categories": v1_categories()})
    sj = write_json(tmp_path / "stuff_val2017.json", stuff_doc(imgs, stuff))
    out = tmp_path / "out"
    # spawned workers: the packed annotations are memory-mapped, not pickled
    prepare_coco_lvis(coco, [lj], [sj], out, opts=ConvertOptions(workers=2, samples_per_shard=2))
    assert list(verify_shards(out)) == []
    s = by_id(read_samples(out, "val"))
    ref = reference(lj, [sj], int, lambda a: np.vectorize(intended_value)(a))
    for iid in range(1, 5):
        assert np.array_equal(s[iid]["label"], to_train(ref[iid])), iid
    assert sum(len(v["classes"]) for v in s.values()) > 8  # the overlaps really exercised classes


def test_single_annotation_ids_above_255_do_not_wrap(tmp_path: Path) -> None:
    """ESSNet keeps a one-annotation stuff mask uint8, so 1204 would wrap to 180: not here."""
    coco = tmp_path / "coco"
    imgs = [coco_image(1, 8, 8, "val2017"), coco_image(2, 8, 8, "val2017")]
    for i in (1, 2):
        write_jpeg(coco / "val2017" / f"{i:012d}.jpg", 8, 8)
    lj = write_json(tmp_path / "lvis_v1_val.json", {"images": imgs, "categories": v1_categories(),
                    "annotations": [{"id": 1, "image_id": 2, "category_id": 1000,
                                     "segmentation": [rect(0, 0, 8, 8)]}]})
    sj = write_json(tmp_path / "stuff_val2017.json",
                    stuff_doc(imgs, [(1, 94, np.ones((8, 8), bool))]))
    out = tmp_path / "out"
    prepare_coco_lvis(coco, [lj], [sj], out, essnet_compat=True, opts=OPTS)
    s = by_id(read_samples(out, "val"))
    assert s[1]["classes"] == [1203] and (s[1]["label"] == 1203).all()
    assert s[2]["classes"] == [999] and (s[2]["label"] == 999).all()


def test_bad_inputs(tmp_path: Path) -> None:
    coco, lj, sj = merge_tree(tmp_path)
    doc = json.loads(lj.read_text())
    doc["annotations"][1]["category_id"] = 1500
    bad = write_json(tmp_path / "bad" / "lvis_v1_val.json", doc)
    with pytest.raises(UserError, match=r"lvis_v1_val\.json.*unknown category id 1500"):
        prepare_coco_lvis(coco, [bad], [sj], tmp_path / "o1", opts=OPTS)
    sdoc = json.loads(sj.read_text())
    sdoc["annotations"][0]["category_id"] = 1
    sbad = write_json(tmp_path / "bad" / "stuff_val2017.json", sdoc)
    with pytest.raises(UserError, match=r"stuff_val2017\.json.*category id 1,"):
        prepare_coco_lvis(coco, [lj], [sbad], tmp_path / "o2", opts=OPTS)
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(UserError, match=r"broken\.json is not valid JSON"):
        prepare_coco_lvis(coco, [tmp_path / "broken.json"], [sj], tmp_path / "o3", opts=OPTS)
    with pytest.raises(UserError, match="no such LVIS JSON"):
        prepare_coco_lvis(coco, [tmp_path / "nope.json"], [sj], tmp_path / "o4", opts=OPTS)
    with pytest.raises(UserError, match="--root"):
        prepare_coco_lvis(tmp_path / "nothing", [lj], [sj], tmp_path / "o5", opts=OPTS)
    # an LVIS image that no stuff JSON lists
    sdoc = json.loads(sj.read_text())
    sdoc["images"] = sdoc["images"][:1]
    part = write_json(tmp_path / "part" / "stuff_val2017.json", sdoc)
    with pytest.raises(UserError, match=r"1 of 2 LVIS images are in none of the --stuff-json"
                                        r".*train2017/000000000002\.jpg"):
        prepare_coco_lvis(coco, [lj], [part], tmp_path / "o6", opts=OPTS)
    index = prepare_coco_lvis(coco, [lj], [part], tmp_path / "o7",
                              opts=ConvertOptions(workers=0, on_error="skip"))
    assert index["splits"]["val"]["num_samples"] == 1 and index["splits"]["val"]["num_skipped"] == 1


def test_missing_image(tmp_path: Path) -> None:
    coco, lj, sj = merge_tree(tmp_path)
    missing = coco / "train2017" / "000000000002.jpg"
    missing.unlink()
    with pytest.raises(UserError, match=r"train2017/000000000002\.jpg: image is missing.*--on-error skip"):
        prepare_coco_lvis(coco, [lj], [sj], tmp_path / "o1", opts=OPTS)
    out = tmp_path / "o2"
    index = prepare_coco_lvis(coco, [lj], [sj], out, opts=ConvertOptions(workers=0, on_error="skip"))
    assert index["splits"]["val"]["num_skipped"] == 1
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped[0]["key"] == "000000000002" and str(missing) in skipped[0]["reason"]
    assert list(verify_shards(out)) == []


# --------------------------------------------------------------------------- real fixtures


# LVIS v0.5 val images whose real annotations are re-used for images we have pixels for
# (a real COCO-Stuff image, or a real val2017 JPEG) of a size that contains them.
DONORS = {934: (91654, "train2017"), 13715: (11813, "train2017"),
          142238: (521509, "val2017"), 439180: (396526, "val2017")}


@pytest.mark.parametrize("limit", [12, pytest.param(None, marks=pytest.mark.slow)])
def test_real_lvis_v05_and_coco_stuff(tmp_path: Path, shared_fixtures: Path, limit: int | None) -> None:
    """lvis_val_100.json (LVIS v0.5, real polygons) + stuff_examples.json (real RLEs) + the two real
    val2017 JPEGs. No image has all pieces, so: the 100 LVIS images get placeholder JPEGs and a
    generated stuff JSON; a second LVIS JSON puts real LVIS annotations on the two COCO-Stuff
    images (placeholder JPEGs) and on the two real JPEGs."""
    lvis_path = shared_fixtures / "coco_lvis" / "lvis" / "lvis_val_100.json"
    stuff_path = shared_fixtures / "coco_stuff" / "annotations" / "stuff_examples.json"
    real_dir = shared_fixtures / "coco_panoptic_sample" / "val2017"
    lvis = json.loads(lvis_path.read_text())
    real_stuff = json.loads(stuff_path.read_text())
    coco = tmp_path / "coco"
    rng = np.random.default_rng(0)
    converted = set(sorted(i["id"] for i in lvis["images"])[:limit])  # keys are zero-padded ids
    for img in lvis["images"]:
        if img["id"] in converted:
            write_jpeg(coco / "val2017" / f"{img['id']:012d}.jpg", img["height"], img["width"],
                       seed=img["id"])
    # generated stuff for the val images: a random field of real stuff classes incl. merges
    gen_imgs, gen_anns = [], []
    sizes = {i["id"]: (i["height"], i["width"]) for i in lvis["images"]}
    for iid, (real, donor_folder) in DONORS.items():
        if donor_folder == "val2017":
            shutil.copy(real_dir / f"{iid:012d}.jpg", coco / "val2017" / f"{iid:012d}.jpg")
    for name in ("000000142238.jpg", "000000439180.jpg"):
        with Image.open(real_dir / name) as im:
            sizes[int(name[:-4])] = (im.height, im.width)
    for iid, (h, w) in sizes.items():
        gen_imgs.append({"id": iid, "height": h, "width": w})
        if iid not in converted | set(DONORS):
            continue
        field = rng.choice([93, 98, 108, 141, 157, 165, 183], size=(h // 40 + 1, w // 40 + 1))
        field = np.kron(field, np.ones((40, 40), int))[:h, :w]
        gen_anns += [(iid, int(k), field == k) for k in np.unique(field)]
    gen = write_json(tmp_path / "stuff_val2017_gen.json", stuff_doc(gen_imgs, gen_anns))
    # LVIS annotations moved onto the COCO-Stuff images and the real JPEGs
    comb_imgs, comb_anns = [], []
    for iid, (donor, folder) in DONORS.items():
        h, w = next(((i["height"], i["width"]) for i in real_stuff["images"] if i["id"] == iid),
                    sizes.get(iid, (0, 0)))
        comb_imgs.append(coco_image(iid, h, w, folder))
        if folder == "train2017":
            write_jpeg(coco / folder / f"{iid:012d}.jpg", h, w, seed=iid)
        comb_anns += [dict(a, image_id=iid) for a in lvis["annotations"] if a["image_id"] == donor]
    for i, a in enumerate(comb_anns):
        a["id"] = 10_000_000 + i
    comb = write_json(tmp_path / "lvis_v0.5_train_combined.json",
                      {"images": comb_imgs, "annotations": comb_anns, "categories": lvis["categories"]})

    out = tmp_path / "out"
    index = prepare_coco_lvis(coco, [lvis_path, comb], [stuff_path, gen], out,
                              opts=ConvertOptions(workers=0, limit=limit))
    assert list(verify_shards(out)) == []
    names = index["class_names"]
    assert index["num_classes"] == 1230 + 82 and index["options"]["vocabulary"] == "lvis_json"
    assert names[:1230] == [c["name"] for c in sorted(lvis["categories"], key=lambda c: c["id"])]
    assert "cupboard" in names[1230:] and "blanket" not in names[1230:]  # v0.5 has no cupboard
    assert index["splits"]["val"]["num_samples"] == (limit or 100)
    assert index["splits"]["train"]["num_samples"] == 4

    # reference in class-name space: LVIS category names, COCO-Stuff category names
    lvis_names = {c["id"]: c["name"] for c in lvis["categories"]}
    stuff_names = {c["id"]: c["name"] for c in real_stuff["categories"]}
    pos = {n: i for i, n in enumerate(names)}
    assert len(pos) == len(names)

    def lvis_value(cat: int) -> int:
        return pos[lvis_names[cat]] + 1

    def stuff_map(a: np.ndarray) -> np.ndarray:
        lut = np.zeros(256, np.int64)
        for k, n in stuff_names.items():
            lut[k] = 0 if k == 183 else pos[n] + 1
        return lut[a]

    for split, jpath, stuffs in (("val", lvis_path, [gen]), ("train", comb, [stuff_path, gen])):
        got = by_id(read_samples(out, split))
        ref = reference(jpath, stuffs, lvis_value, stuff_map, only=converted | set(DONORS))
        assert set(got) == set(ref)
        for iid in got:
            assert np.array_equal(got[iid]["label"], to_train(ref[iid])), (split, iid)
    train = by_id(read_samples(out, "train"))
    for iid in (142238, 439180):  # real JPEG bytes kept as they are
        assert train[iid]["image"] == (real_dir / f"{iid:012d}.jpg").read_bytes()
    real_classes = {names[c] for iid in (934, 13715) for c in train[iid]["classes"]}
    real_stuff_names = {stuff_names[a["category_id"]] for a in real_stuff["annotations"]
                        if a["category_id"] != 183}
    assert len(real_classes & real_stuff_names) >= 3  # real COCO-Stuff pixels made it in


# --------------------------------------------------------------------------- CLI


def cli(*args: object):
    from rankseg_cli import prepare_video_lvis  # noqa: F401  (registers the commands)
    from rankseg_cli.app import app

    return CliRunner().invoke(app, ["prepare", "coco-lvis", *map(str, args)])


def test_cli(tmp_path: Path) -> None:
    coco, lj, sj = merge_tree(tmp_path)
    out = tmp_path / "out"
    res = cli("--coco-root", coco, "--lvis-json", lj, "--stuff-json", sj, "--out", out, "--workers", 0)
    assert res.exit_code == 0, res.output
    assert "val: 2 samples" in res.output and list(verify_shards(out)) == []
    assert_one_line_error(cli("--coco-root", tmp_path / "x", "--lvis-json", lj, "--stuff-json", sj,
                              "--out", tmp_path / "o"), "--root")
    assert_one_line_error(cli("--coco-root", coco, "--lvis-json", tmp_path / "none.json", "--stuff-json",
                              sj, "--out", tmp_path / "o"), "none.json", "no such LVIS JSON")
    (tmp_path / "bad.json").write_text("{not json")
    assert_one_line_error(cli("--coco-root", coco, "--lvis-json", tmp_path / "bad.json", "--stuff-json",
                              sj, "--out", tmp_path / "o"), "bad.json is not valid JSON")
    doc = json.loads(lj.read_text())
    doc["annotations"][0]["category_id"] = 99999
    bad = write_json(tmp_path / "b" / "lvis_v1_val.json", doc)
    assert_one_line_error(cli("--coco-root", coco, "--lvis-json", bad, "--stuff-json", sj,
                              "--out", tmp_path / "o"), "unknown category id 99999")
    assert_one_line_error(cli("--coco-root", coco, "--lvis-json", lj, "--lvis-json", bad, "--split", "x",
                              "--stuff-json", sj, "--out", tmp_path / "o"), "--split")
    assert_one_line_error(cli("--coco-root", coco, "--lvis-json", lj, "--split", "a/b", "--stuff-json", sj,
                              "--out", tmp_path / "o"), "--split")
    index = prepare_coco_lvis(coco, [lj], [sj], tmp_path / "named", split="minival", opts=OPTS)
    assert list(index["splits"]) == ["minival"]
    assert cli("--help").exit_code == 0 and "Example" in cli("--help").output
