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
dataset is identical for a given seed whatever the number of workers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .codec import IGNORE, encode_jpeg
from .shards import EncodedSample, encode_sample

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
    scenes_bg: np.ndarray  # S, the background class of each scene
    scenes_objects: np.ndarray  # S x CLASSES_PER_SCENE object classes
    scene_weights: np.ndarray  # S, Zipf-like
    names: tuple[str, ...]


def make_world(num_classes: int, seed: int) -> World:
    if num_classes < 40:
        raise ValueError("the synthetic dataset needs --num-classes >= 40")
    rng = np.random.default_rng([seed, 0])
    # One background class per scene; ~1/25 of the vocabulary are backgrounds ("stuff").
    num_scenes = max(2, num_classes // 25)
    perm = rng.permutation(num_classes)
    backgrounds, objects = perm[:num_scenes], perm[num_scenes:]
    appearance = np.full(num_classes, -1)
    appearance[objects] = np.arange(len(objects)) % NUM_APPEARANCES
    bg_colour = np.zeros((num_classes, 3), np.uint8)
    bg_colour[backgrounds] = rng.integers(20, 236, (num_scenes, 3))

    by_app = [objects[appearance[objects] == a] for a in range(NUM_APPEARANCES)]
    scene_obj = np.empty((num_scenes, CLASSES_PER_SCENE), np.int64)
    for s in range(num_scenes):  # a scene's objects have distinct appearances
        apps = rng.choice(NUM_APPEARANCES, CLASSES_PER_SCENE, replace=False)
        scene_obj[s] = [rng.choice(by_app[a]) for a in apps]
    weights = 1.0 / np.arange(1, num_scenes + 1) ** 0.8
    weights = rng.permutation(weights / weights.sum())

    cnames, tnames = list(COLOURS), TEXTURES
    names = []
    for k in range(num_classes):
        if appearance[k] < 0:
            names.append(f"background-{k:04d}")
        else:
            a = appearance[k]
            names.append(f"{cnames[a % len(cnames)]}-{tnames[a // len(cnames)]}-{k:04d}")
    return World(num_classes, appearance, bg_colour, backgrounds, scene_obj, weights, tuple(names))


def _texture(kind: int, h: int, w: int, period: int) -> np.ndarray:
    """H x W multiplicative pattern in [0.55, 1] for a texture id."""
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == 0:
        return np.ones((h, w))
    if kind == 1:
        band = (yy // period) % 2
    elif kind == 2:
        band = (xx // period) % 2
    else:
        band = ((yy // period) + (xx // period)) % 2
    return 1.0 - 0.45 * band


def render(world: World, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image: (H x W x 3 uint8 RGB, H x W uint16 label)."""
    h = w = size
    scene = rng.choice(len(world.scenes_bg), p=world.scene_weights)
    n_obj = int(rng.integers(1, MAX_OBJECTS + 1))
    # Within a scene, earlier objects are more frequent (long tail inside each scene too).
    p = 1.0 / np.arange(1, CLASSES_PER_SCENE + 1)
    objs = rng.choice(world.scenes_objects[scene], n_obj, replace=False, p=p / p.sum())

    # Regions: a noisy Voronoi partition; the background owns the cells not given to objects.
    n_cells = n_obj + int(rng.integers(2, 6))
    seeds = rng.uniform(0, size, (n_cells, 2)).astype(np.float32)
    cell_class = np.concatenate([objs, np.full(n_cells - n_obj, world.scenes_bg[scene])])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = size / 12
    ys = yy + warp * np.sin(xx / size * rng.uniform(4, 9) + rng.uniform(0, 6.3))
    xs = xx + warp * np.sin(yy / size * rng.uniform(4, 9) + rng.uniform(0, 6.3))
    d = (ys[None] - seeds[:, 0, None, None]) ** 2 + (xs[None] - seeds[:, 1, None, None]) ** 2
    label = cell_class[np.argmin(d, axis=0)].astype(np.uint16)

    image = np.zeros((h, w, 3), np.float32)
    period = max(2, size // 32)
    for k in np.unique(label):  # a handful of classes per image: loop over classes, not pixels
        m = label == k
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
    image = np.clip(image, 0, 255).astype(np.uint8)

    # Like real annotations, region boundaries are left unlabelled.
    edge = np.zeros((h, w), bool)
    edge[1:] |= label[1:] != label[:-1]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    label[edge] = IGNORE
    return image, label


SPLIT_IDS = {"train": 1, "val": 2}


def make_sample(key: str, *, world: World, seed: int, size: int) -> EncodedSample:
    """Sample `key` = '{split}_{index:06d}' as it is stored in the shards."""
    split, idx = key.rsplit("_", 1)
    rng = np.random.default_rng([seed, SPLIT_IDS[split], int(idx)])
    image, label = render(world, rng, size)
    return encode_sample(key, encode_jpeg(image), label, world.num_classes)


def split_keys(split: str, n: int) -> list[str]:
    return [f"{split}_{i:06d}" for i in range(n)]


def sample_maker(world: World, seed: int, size: int):
    return functools.partial(make_sample, world=world, seed=seed, size=size)


def prepare_synthetic(out, *, num_classes: int = 1000, images: int = 1000, val_images: int | None = None,
                      size: int = 128, seed: int = 0, opts=None) -> dict | None:
    """Write the synthetic dataset (train + val) to `out` and return its `dataset.json`."""
    from .convert.common import ConvertOptions, run_conversion
    from .errors import UserError
    from .shards import DatasetHeader

    if images < 1 or size < 32 or size % 16:
        raise UserError("--images must be >= 1 and --size a multiple of 16, >= 32")
    try:
        world = make_world(num_classes, seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    val_images = max(1, images // 5) if val_images is None else val_images
    header = DatasetHeader(
        name="synthetic", class_names=list(world.names), source="rankseg synthetic generator",
        options={"num_classes": num_classes, "images": images, "val_images": val_images,
                 "size": size, "seed": seed})
    splits = {"train": split_keys("train", images), "val": split_keys("val", val_images)}
    return run_conversion(out, header, splits, sample_maker(world, seed, size),
                          opts or ConvertOptions(samples_per_shard=500))
