"""The built-in synthetic large-vocabulary dataset (see docs/synthetic.md).

It is built so that the RankSeg idea matters, as on ADE20K-Full or COCO+LVIS:
- K classes (default 1000) but each image shows one *scene* (a co-occurrence group) with a
  background class and at most 10 of that scene's object classes, so images contain few of
  the K classes;
- a class's *appearance* (colour x texture) is shared by ~K/32 classes of different scenes,
  so a pixel alone is ambiguous among them; the image's other regions (above all its
  scene-specific background) say which scene, hence which of them it is;
- scenes and classes within a scene are drawn with Zipf-like frequencies, giving the long
  tail of real data.

Everything is a function of (seed, split, index), so any worker can make any sample and the
dataset is identical for a given seed whatever the number of workers. An optional `pretrain`
split draws more images of the same world from its own stream (split id 3), disjoint from
train / val, whose bytes it leaves unchanged. Two world options (`make_world`) make the scene
harder to read: B backgrounds shared by the S scenes, and every object class in some scene;
without them the world is today's, byte for byte.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rankseg_core.convert.segments import panoptic_sample
from rankseg_core.shards.codec import IGNORE, encode_jpeg
from rankseg_core.shards.write import EncodedSample, encode_sample

COLOURS = {  # name -> RGB; 8 base colours x 4 textures = 32 object appearances
    "red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40),
    "purple": (140, 50, 170), "cyan": (40, 190, 200), "orange": (235, 130, 30), "grey": (128, 128, 128),
}
TEXTURES = ("flat", "hstripe", "vstripe", "checker")
NUM_APPEARANCES = len(COLOURS) * len(TEXTURES)
CLASSES_PER_SCENE = 24  # object classes a scene can show (distinct appearances)
MAX_OBJECTS = 9  # per image, plus the background: <= 10 classes


@dataclass(frozen=True)
class World:
    """The fixed class/scene structure of one seed."""

    num_classes: int
    appearance: np.ndarray  # K, appearance id of each object class (-1 for backgrounds)
    background_colour: np.ndarray  # K x 3, used for background classes
    scenes_bg: np.ndarray  # S, the background class of each scene (B <= S distinct ones)
    scenes_objects: np.ndarray  # S x P object classes, in the scene's frequency order (P = 24 by default)
    scene_weights: np.ndarray  # S, Zipf-like
    names: tuple[str, ...]


def num_scenes(num_classes: int) -> int:
    """S, the scenes of a world of K classes: one per 25 classes, at least 2."""
    return max(2, num_classes // 25)


def make_world(num_classes: int, seed: int, *, backgrounds: int | None = None, all_classes: bool = False) -> World:
    """The world of (K, seed) and the two world options (docs/synthetic.md, "Harder worlds").

    backgrounds: B background classes shared by the S scenes (scene s shows background s mod B);
        None or S = one background per scene, today's world drawn by exactly today's code path.
    all_classes: every object class belongs to at least one scene (default: each scene draws
        its objects with replacement, so some classes belong to none).
    ValueError (one line, naming the option) for a world that cannot be built.
    """
    if num_classes < 40:
        raise ValueError("the synthetic dataset needs --num-classes >= 40")
    n_scenes = num_scenes(num_classes)
    n_bg = n_scenes if backgrounds is None else int(backgrounds)
    if not 1 <= n_bg <= n_scenes:
        raise ValueError(f"--backgrounds {n_bg}: must be 1..{n_scenes}, the number of scenes at --num-classes "
                         f"{num_classes} (K // 25, at least 2); {n_scenes} = one background per scene")
    rng = np.random.default_rng([seed, 0])
    # ~1/25 of the vocabulary would be backgrounds ("stuff"); with shared backgrounds the
    # vocabulary keeps its size and the freed classes become objects.
    perm = rng.permutation(num_classes)
    bg_classes, objects = perm[:n_bg], perm[n_bg:]
    appearance = np.full(num_classes, -1)
    appearance[objects] = np.arange(len(objects)) % NUM_APPEARANCES
    bg_colour = np.zeros((num_classes, 3), np.uint8)
    bg_colour[bg_classes] = rng.integers(20, 236, (n_bg, 3))
    # s mod B: the scenes' Zipf weights are permuted below, so which scenes share is random.
    backgrounds_of = bg_classes[np.arange(n_scenes) % n_bg]

    by_app = [objects[appearance[objects] == a] for a in range(NUM_APPEARANCES)]
    if all_classes:
        scene_obj = _cover_scenes(rng, by_app, n_scenes)
    else:
        scene_obj = np.empty((n_scenes, CLASSES_PER_SCENE), np.int64)
        for s in range(n_scenes):  # a scene's objects have distinct appearances
            apps = rng.choice(NUM_APPEARANCES, CLASSES_PER_SCENE, replace=False)
            scene_obj[s] = [rng.choice(by_app[a]) for a in apps]
    weights = 1.0 / np.arange(1, n_scenes + 1) ** 0.8
    weights = rng.permutation(weights / weights.sum())

    cnames, tnames = list(COLOURS), TEXTURES
    names = []
    for k in range(num_classes):
        if appearance[k] < 0:
            names.append(f"background-{k:04d}")
        else:
            a = appearance[k]
            names.append(f"{cnames[a % len(cnames)]}-{tnames[a // len(cnames)]}-{k:04d}")
    return World(num_classes, appearance, bg_colour, backgrounds_of, scene_obj, weights, tuple(names))


def _cover_scenes(rng: np.random.Generator, by_app: list[np.ndarray], n_scenes: int) -> np.ndarray:
    """S x P object classes such that every class of `by_app` (the classes of each look) is in
    some scene and no scene has two classes of one look. P = max(24, ceil(objects / S)): the
    S x 24 slots of the default world hold every object only when B = S and K = 25 S.

    Each look a needs m_a >= n_a (its classes) distinct scenes. Dealing the sequence
    [a] * m_a (looks one after another) round-robin over the scenes gives each scene P
    entries, and each look distinct scenes whenever m_a <= S."""
    need = np.array([len(c) for c in by_app])
    if need.max() > n_scenes:
        raise ValueError(f"--all-classes: a look has {need.max()} classes but there are only {n_scenes} scenes to "
                         "put them in (a scene shows one class per look); use another --num-classes")
    per_scene = max(CLASSES_PER_SCENE, -(-int(need.sum()) // n_scenes))
    slots = need.copy()
    for _ in range(n_scenes * per_scene - int(need.sum())):  # the spare slots go to random looks
        slots[rng.choice(np.flatnonzero((slots < n_scenes) & (need > 0)))] += 1
    looks = np.concatenate([np.full(slots[a], a) for a in rng.permutation(NUM_APPEARANCES)])
    scene_of = np.arange(len(looks)) % n_scenes
    scene_obj = np.empty((n_scenes, per_scene), np.int64)
    filled = np.zeros(n_scenes, np.int64)
    for a in np.flatnonzero(slots):
        scenes = scene_of[looks == a]
        # Every class of the look once, the spare slots with random ones of it.
        classes = np.concatenate([by_app[a], rng.choice(by_app[a], len(scenes) - len(by_app[a]))])
        for s, c in zip(scenes, rng.permutation(classes)):
            scene_obj[s, filled[s]] = c
            filled[s] += 1
    # The order inside a scene is its frequency order (weights 1/rank): draw it at random.
    return np.stack([rng.permutation(row) for row in scene_obj])


def scenes_of(world: World, classes: np.ndarray) -> np.ndarray:
    """The scenes whose classes (background and objects) include every one of `classes` (the
    classes an image shows): the scenes that could have drawn the image. With one background
    per scene this is the background's scene; with shared backgrounds, several may fit."""
    have = set(int(c) for c in classes)
    return np.asarray([s for s in range(len(world.scenes_bg))
                       if have <= {int(world.scenes_bg[s]), *world.scenes_objects[s].tolist()}], np.int64)


def world_of(options: dict) -> World:
    """The world a synthetic shard directory was drawn from, from its dataset.json `options`."""
    return make_world(int(options["num_classes"]), int(options["seed"]), backgrounds=options.get("backgrounds"),
                      all_classes=bool(options.get("all_classes", False)))


def _texture(kind: int, h: int, w: int, period: int, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """H x W multiplicative pattern in [0.55, 1] for a texture id, anchored at `offset` (a
    moving object of the synthetic videos carries its texture along)."""
    yy, xx = np.mgrid[0:h, 0:w]
    yy, xx = yy - offset[0], xx - offset[1]
    if kind == 0:
        return np.ones((h, w))
    if kind == 1:
        band = (yy // period) % 2
    elif kind == 2:
        band = (xx // period) % 2
    else:
        band = ((yy // period) + (xx // period)) % 2
    return 1.0 - 0.45 * band


def _cells(rng: np.random.Generator, size: int, n_cells: int) -> np.ndarray:
    """H x W index of the noisy-Voronoi cell (0..n_cells-1) owning each pixel."""
    h = w = size
    seeds = rng.uniform(0, size, (n_cells, 2)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = size / 12
    ys = yy + warp * np.sin(xx / size * rng.uniform(4, 9) + rng.uniform(0, 6.3))
    xs = xx + warp * np.sin(yy / size * rng.uniform(4, 9) + rng.uniform(0, 6.3))
    d = (ys[None] - seeds[:, 0, None, None]) ** 2 + (xs[None] - seeds[:, 1, None, None]) ** 2
    return np.argmin(d, axis=0)


def _paint(world: World, rng: np.random.Generator, regions: np.ndarray, region_class: np.ndarray | None) -> np.ndarray:
    """H x W x 3 uint8 RGB: each region (value of `regions`) in its class's look with its own shade.

    `region_class[r]` is region r's class; None means the regions are the classes themselves.
    """
    h, w = regions.shape
    image = np.zeros((h, w, 3), np.float32)
    period = max(2, h // 32)
    for r in np.unique(regions):  # a handful of regions per image: loop over them, not pixels
        m = regions == r
        k = r if region_class is None else region_class[r]
        a = world.appearance[k]
        if a < 0:
            colour = world.background_colour[k].astype(np.float32)
            pattern = np.ones((h, w))
        else:
            colour = np.asarray(list(COLOURS.values())[a % len(COLOURS)], np.float32)
            pattern = _texture(a // len(COLOURS), h, w, period)
        shade = rng.uniform(0.8, 1.1)
        image[m] = colour * (pattern[m, None] * shade)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _edges(regions: np.ndarray) -> np.ndarray:
    """H x W bool: pixels whose upper or left neighbour lies in another region."""
    edge = np.zeros(regions.shape, bool)
    edge[1:] |= regions[1:] != regions[:-1]
    edge[:, 1:] |= regions[:, 1:] != regions[:, :-1]
    return edge


def _scene_objects(world: World, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """A scene and 1..MAX_OBJECTS distinct object classes of it."""
    scene = rng.choice(len(world.scenes_bg), p=world.scene_weights)
    n_obj = int(rng.integers(1, MAX_OBJECTS + 1))
    # Within a scene, earlier objects are more frequent (long tail inside each scene too).
    p = 1.0 / np.arange(1, world.scenes_objects.shape[1] + 1)
    return scene, rng.choice(world.scenes_objects[scene], n_obj, replace=False, p=p / p.sum())


def render(world: World, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image: (H x W x 3 uint8 RGB, H x W uint16 label)."""
    scene, objs = _scene_objects(world, rng)
    # Regions: a noisy Voronoi partition; the background owns the cells not given to objects.
    n_cells = len(objs) + int(rng.integers(2, 6))
    cell_class = np.concatenate([objs, np.full(n_cells - len(objs), world.scenes_bg[scene])])
    label = cell_class[_cells(rng, size, n_cells)].astype(np.uint16)
    image = _paint(world, rng, label, None)
    # Like real annotations, region boundaries are left unlabelled.
    label[_edges(label)] = IGNORE
    return image, label


MAX_INSTANCES = 12  # panoptic: object instances per image


def render_panoptic(world: World, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one panoptic image: (H x W x 3 RGB, H x W segment ids (0 = void), class of each id).

    Every object cell is an instance (a class shows 1-3 instances); the background cells
    together are the one stuff segment, id n_instances + 1. Instances have their own shade,
    and every boundary between segments (also between two instances of one class) is void.
    `segment_class[i]` is the class of id i (entry 0 unused).
    """
    scene, objs = _scene_objects(world, rng)
    copies = 1 + rng.binomial(2, 0.25, len(objs))
    instances = np.repeat(objs, copies)[:MAX_INSTANCES]
    n = len(instances)
    n_cells = n + int(rng.integers(2, 6))
    cell_segment = np.concatenate([np.arange(1, n + 1), np.full(n_cells - n, n + 1)])
    segment_class = np.concatenate([[-1], instances, [world.scenes_bg[scene]]]).astype(np.int64)
    ids = cell_segment[_cells(rng, size, n_cells)]
    image = _paint(world, rng, ids, segment_class)
    ids[_edges(ids)] = 0
    return image, ids, segment_class


SPLIT_IDS = {"train": 1, "val": 2, "pretrain": 3}  # the rng stream of each split


def make_sample(key: str, *, world: World, seed: int, size: int, panoptic: bool = False) -> EncodedSample:
    """Sample `key` = '{split}_{index:06d}' as it is stored in the shards."""
    split, idx = key.rsplit("_", 1)
    rng = np.random.default_rng([seed, SPLIT_IDS[split], int(idx)])
    if not panoptic:
        image, label = render(world, rng, size)
        return encode_sample(key, encode_jpeg(image), label, world.num_classes)
    image, ids, segment_class = render_panoptic(world, rng, size)
    # Every instance is a thing segment, the background the stuff one; a segment that lost
    # all its pixels to the void boundaries is dropped.
    records = [(i, int(c), 0) for i, c in enumerate(segment_class[1:].tolist(), 1)]
    return panoptic_sample(key, encode_jpeg(image), ids, records, world.num_classes, key, drop_empty=True)


def split_keys(split: str, n: int) -> list[str]:
    return [f"{split}_{i:06d}" for i in range(n)]


def sample_maker(world: World, seed: int, size: int, panoptic: bool = False):
    return functools.partial(make_sample, world=world, seed=seed, size=size, panoptic=panoptic)


# ---------------------------------------------------------------------------------------
# Weak-shot splits of the world (docs/synthetic.md, "Weak-shot splits")

LOOK_ALIKE_STREAM = 4  # the rng stream of the split, after the image splits' 1-3
LOOK_ALIKE_FILE = "weak_shot_look_alike.json"


def shown_classes(world: World) -> np.ndarray:
    """The sorted classes some image can show: every scene's background and objects (a class
    no scene draws never appears in any split)."""
    return np.union1d(world.scenes_bg, world.scenes_objects.ravel())


def look_alike_order(world: World, seed: int) -> tuple[np.ndarray, dict[int, int]]:
    """(candidate novel classes in the order they turn novel, look -> its anchor class).

    Per look (colour x texture) shown by the world, one random shown class is its *anchor*,
    base at every ratio; the look's other shown classes are the candidates. Backgrounds have
    a look of their own (a scene colour) and stay base. One order serves every ratio, so a
    larger ratio's novel set contains a smaller one's (as the supplement's splits 5-9 grow
    from split 4)."""
    rng = np.random.default_rng([seed, LOOK_ALIKE_STREAM])
    shown = shown_classes(world)
    objects = shown[world.appearance[shown] >= 0]
    anchors: dict[int, int] = {}
    candidates: list[int] = []
    for look in range(NUM_APPEARANCES):
        same = objects[world.appearance[objects] == look]
        if len(same):
            anchors[look] = int(rng.choice(same))
            candidates += [int(c) for c in same if c != anchors[look]]
    return rng.permutation(np.asarray(candidates, np.int64)), anchors


def look_alike_split(world: World, novel_ratio: float, seed: int) -> dict:
    """A weak-shot split file (docs/weak-shot.md, "Split files") of this world in which every
    novel class shares its look with a base class: the first round(novel_ratio x shown) classes
    of `look_alike_order`, where `shown` counts the classes the world can show. Only the
    choice of novel classes depends on the option: the images are the world's own.

    ValueError when the ratio asks for no class, or for more than the candidates."""
    order, anchors = look_alike_order(world, seed)
    shown = len(shown_classes(world))
    n = int(np.floor(novel_ratio * shown + 0.5)) if 0 < novel_ratio < 1 else 0  # NaN: 0 as well
    if n < 1 or n > len(order):
        raise ValueError(f"--look-alike {novel_ratio:g}: the novel ratio must give 1..{len(order)} of the world's "
                         f"{shown} shown classes (every look keeps one base class)")
    novel = sorted(int(c) for c in order[:n])
    names = world.names
    return {
        "name": f"synthetic look-alike {100 * novel_ratio:g} %",
        "description": f"{n} novel classes of the {shown} the synthetic world (K = {world.num_classes}, seed {seed}) "
                       "can show; each shares its look (colour x texture) with a base class of other scenes",
        "dataset": "synthetic", "num_classes": world.num_classes, "novel": novel,
        "novel_names": [names[c] for c in novel],
        "source": f"rankseg_core/convert/synthetic.py look_alike_split(ratio {novel_ratio:g}, seed {seed})",
        "notes": {"look_alike": {names[c]: names[anchors[int(world.appearance[c])]] for c in novel}},
    }


def prepare_synthetic(out, *, num_classes: int = 1000, images: int = 1000, val_images: int | None = None,
                      size: int = 128, seed: int = 0, panoptic: bool = False, pretrain_images: int = 0,
                      look_alike: float = 0.0, backgrounds: int | None = None, all_classes: bool = False,
                      opts=None) -> dict | None:
    """Write the synthetic dataset (train + val) to `out` and return its `dataset.json`.

    `panoptic`: object classes are things (each drawn object an instance), scene backgrounds
    stuff, written as panoptic (v2) shards. Without it the output is what it always was.
    `pretrain_images`: also write a `pretrain` split of that many images of the same world
    (same classes, scenes and looks) drawn from their own stream, so they never repeat a train
    or val image (a larger disjoint set to pre-train a backbone on, as ImageNet is for the
    paper). The train / val shards stay byte-identical; dataset.json records the option only
    when it is > 0.
    `look_alike` (0 < ratio < 1): also write `LOOK_ALIKE_FILE`, a weak-shot split of this world
    whose novel classes share their looks with base classes (`look_alike_split`); the shards
    and dataset.json are unchanged by it.
    `backgrounds` / `all_classes`: the world options of `make_world` (B shared backgrounds;
    every object class in some scene). dataset.json records `"backgrounds": B` when B < S and
    `"all_classes": true` when set (`world_of` rebuilds the world from them); B = S (or None)
    without `all_classes` writes exactly what earlier versions wrote.
    """
    from rankseg_core.convert.common import ConvertOptions, run_conversion
    from rankseg_core.errors import UserError
    from rankseg_core.shards.write import DatasetHeader

    if images < 1 or size < 32 or size % 16:
        raise UserError("--images must be >= 1 and --size a multiple of 16, >= 32")
    if pretrain_images < 0:
        raise UserError(f"--pretrain-images must be >= 0 (0 = no pretrain split), not {pretrain_images}")
    try:
        world = make_world(num_classes, seed, backgrounds=backgrounds, all_classes=all_classes)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    split = None
    if look_alike:
        if panoptic:
            raise UserError("--look-alike writes a weak-shot split, and weak-shot training is semantic: drop --panoptic")
        try:  # before converting: an impossible ratio must not cost a conversion
            split = look_alike_split(world, look_alike, seed)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    val_images = max(1, images // 5) if val_images is None else val_images
    options = {"num_classes": num_classes, "images": images, "val_images": val_images, "size": size, "seed": seed}
    if panoptic:  # only then: the semantic dataset.json stays byte-identical
        options["panoptic"] = True
    if pretrain_images:  # likewise
        options["pretrain_images"] = pretrain_images
    if backgrounds is not None and backgrounds < num_scenes(num_classes):  # B = S is today's world
        options["backgrounds"] = int(backgrounds)
    if all_classes:
        options["all_classes"] = True
    header = DatasetHeader(
        name="synthetic", class_names=list(world.names), source="rankseg synthetic generator", options=options,
        thing_classes=np.flatnonzero(world.appearance >= 0).tolist() if panoptic else None)
    splits = {"train": split_keys("train", images), "val": split_keys("val", val_images)}
    if pretrain_images:
        splits["pretrain"] = split_keys("pretrain", pretrain_images)
    index = run_conversion(out, header, splits, sample_maker(world, seed, size, panoptic),
                           opts or ConvertOptions(samples_per_shard=500))
    if split is not None:  # after the conversion: it claims `out` only while it is empty or its own
        from rankseg_core.utils.fsio import atomic_write_json

        atomic_write_json(Path(out) / LOOK_ALIKE_FILE, split)
    return index
