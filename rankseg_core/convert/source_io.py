"""Reading source files of the official releases: bytes, JPEGs, masks and annotation JSONs.

Every converter goes through these so that a missing, empty, truncated or corrupt file gives
the same one-line error naming it, and JPEG handling (truncation check, EXIF) is identical.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.codec import IGNORE, MAX_FILE_BYTES, check_pixel_limit, header_size
from rankseg_core.utils.fsio import open_regular, read_regular

BAD = IGNORE - 1  # LUT marker for values outside the release's label domain (never a train id here)
JPEG_QUALITY = 95  # re-encoding only happens when a protocol resizes (or EXIF would rotate)


# --- reading and checking one sample -------------------------------------------------------

def label_ids(values: object, path: str, variable: str, release: str) -> np.ndarray:
    """A MATLAB label variable as an H x W uint16 array of ids; SampleError naming the file when it
    is not a non-empty 2-D array of whole numbers in 0..65535 (`release`: what the file should be)."""
    if not isinstance(values, np.ndarray) or values.ndim != 2 or values.size == 0:
        raise SampleError(f"{path}: no 2-D label map {variable!r}: not a {release} file")
    if values.dtype != np.uint16:
        if not (np.issubdtype(values.dtype, np.number) and np.all(np.mod(values, 1) == 0)
                and values.min() >= 0 and values.max() < 65536):
            raise SampleError(f"{path}: {variable!r} holds {values.dtype} values that are not label ids")
        values = values.astype(np.uint16)
    return values


def read_bytes(path: str | Path, what: str) -> bytes:
    """The file's bytes; a SampleError naming it when it is missing, empty, not a regular file
    (a FIFO or a link to a device would block or never end) or over codec.MAX_FILE_BYTES."""
    try:
        data = read_regular(path, what, MAX_FILE_BYTES, SampleError)
    except FileNotFoundError:
        raise SampleError(f"{path}: {what} is missing") from None
    except OSError as exc:
        raise SampleError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if not data:
        raise SampleError(f"{path}: {what} is empty (0 bytes): re-extract it from the release")
    return data


def _jpeg_is_truncated(data: bytes) -> bool:
    """True when the bytes lack the JPEG end-of-image marker at the end (after trailing padding).

    OpenCV decodes a truncated JPEG with only a warning, filling the rest with grey, so a
    cut download would silently become training data. The check is O(1); only files that
    fail it get PIL's strict decode, which tells a truncated file from harmless trailing bytes.
    """
    return not data.rstrip(b"\x00\r\n \t").endswith(b"\xff\xd9")


def _exif_orientation(data: bytes) -> int:
    """EXIF orientation tag (1 = none) of JPEG bytes; parses EXIF only when an APP1 block exists."""
    if b"Exif\x00\x00" not in data[:65536]:
        return 1
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - an unreadable EXIF block does not rotate anything
        return 1


def check_pixels(data: bytes, path: str | Path, what: str) -> None:
    """SampleError naming `path` when the file's header claims more than codec.MAX_PIXELS pixels."""
    try:
        check_pixel_limit(data, what)
    except ValueError as exc:
        raise SampleError(f"{path}: {exc}") from None


def decode_jpeg(data: bytes, path: str | Path) -> np.ndarray:
    """H x W x 3 uint8 BGR pixels of an image file as stored (EXIF orientation NOT applied).

    Masks are annotated on the stored pixel grid, so the orientation tag must be ignored.
    Raises SampleError (naming `path`) for corrupt or truncated data, or an image over the
    pixel limit (checked on the header, before decoding).
    """
    check_pixels(data, path, "image")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise SampleError(f"{path}: corrupt or unsupported image: re-extract it from the release")
    if data[:2] == b"\xff\xd8" and _jpeg_is_truncated(data):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this sample's problem
            raise SampleError(f"{path}: truncated or corrupt JPEG ({exc}): re-extract it from "
                              "the release") from None
    return img


def encode_jpeg_bgr(image_bgr: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - only fails on invalid input
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def stored_image_bytes(data: bytes, image_bgr: np.ndarray) -> bytes:
    """The bytes to store for an image kept at its size: the source bytes, unless EXIF would rotate.

    Readers (`codec.decode_image`, PIL's `exif_transpose`, browsers) may apply the orientation
    tag, which would turn the image against its mask; such rare files are re-encoded once.
    """
    return data if _exif_orientation(data) == 1 else encode_jpeg_bgr(image_bgr)


def decode_mask(data: bytes, path: str | Path) -> np.ndarray:
    """H x W uint8/uint16 values of a single-channel (greyscale or palette) PNG mask."""
    check_pixels(data, path, "mask")
    arr = np.frombuffer(data, np.uint8)
    mask: np.ndarray | None  # cv2.imdecode returns None for undecodable data
    # IHDR colour type 3 = palette: OpenCV would expand it to colours, we need the indices.
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 25 and data[25] == 3:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                mask = np.asarray(im)
        except Exception as exc:  # noqa: BLE001
            raise SampleError(f"{path}: corrupt PNG mask ({exc}): re-extract it from the release") from None
    else:
        mask = cv2.imdecode(arr, cv2.IMREAD_UNCHANGED)
        if mask is None:
            raise SampleError(f"{path}: corrupt or unsupported mask: re-extract it from the release")
    if mask.ndim != 2 or mask.dtype not in (np.uint8, np.uint16):
        raise SampleError(f"{path}: expected a single-channel 8-bit PNG mask of class values, got "
                          f"{mask.dtype} with shape {mask.shape}")
    return mask


def decode_rgb_mask(data: bytes, path: str | Path, what: str) -> np.ndarray:
    """H x W x 3 uint8 RGB of an 8-bit colour PNG whose colours encode values (COCO panoptic
    segment ids, ADE20K instance channels); an alpha channel is dropped. SampleError naming
    `path` for anything else."""
    check_pixels(data, path, what)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise SampleError(f"{path}: corrupt or unsupported {what}: re-extract it from the release")
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (3, 4):
        raise SampleError(f"{path}: expected an 8-bit RGB {what}, got {img.dtype} with shape {img.shape}")
    return img[..., 2::-1]  # OpenCV decodes as BGR(A)


def check_header_sizes(image: bytes, mask: bytes, mask_path: str | Path) -> None:
    """SampleError when the PNG / JPEG headers of an image and its mask give different sizes.

    Called before decoding either: a small mask file that would decode to a huge grid is
    refused from its 24-byte header, not after its pixels were allocated. Formats without a
    header read here are left to `check_same_size` after decoding.
    """
    a, b = header_size(image), header_size(mask)
    if a is not None and b is not None:
        check_same_size(a, b, mask_path)


def check_same_size(image_shape: tuple[int, ...], mask_shape: tuple[int, ...], mask_path: str | Path) -> None:
    if tuple(image_shape[:2]) != tuple(mask_shape[:2]):
        raise SampleError(f"{mask_path}: mask is {mask_shape[1]}x{mask_shape[0]} but its image is "
                          f"{image_shape[1]}x{image_shape[0]} (W x H): the pair does not belong together")


def _open_source(path: Path, what: str) -> BinaryIO:
    """An annotation file opened for reading: UserError when it is missing or not a regular file."""
    try:
        return open_regular(path, what)
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what} file: check the path") from None


# A split list (one key per line) of the largest release is a few MB; far more is not a list.
MAX_LIST_BYTES = 1 << 28


def read_list(path: str | Path) -> str:
    """The text of a release's list file (split lists); UserError naming it when it is not a
    regular file (a FIFO would block), over MAX_LIST_BYTES, unreadable or not UTF-8."""
    try:
        return read_regular(path, "list file", MAX_LIST_BYTES, UserError).decode("utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read the list file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: the list file is not UTF-8 text: re-extract it from the release") from None


def load_json(path: str | Path, what: str) -> dict:
    """Parse an annotation JSON; a missing or invalid file is a UserError naming it."""
    path = Path(path)
    try:
        with _open_source(path, what) as f:
            doc = json.load(f)
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): re-download or re-extract it") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a JSON object with 'images' and 'annotations' ({what})")
    return doc


def stream_items(path: str | Path, prefix: str, what: str) -> Iterator:
    """The items of the JSON array at `prefix` (e.g. "annotations.item"), one at a time.

    Streaming (ijson's C parser) keeps memory flat on GB-sized annotation files; `json.load`
    of LVIS v1 train alone takes about 7 GB. Numbers are int or float as with `json.load`
    (float parsing is correctly rounded in both). Invalid JSON is a UserError naming the file;
    unlike `json.load`, the non-JSON tokens NaN / Infinity and numbers beyond a double's range
    (1e400) are invalid JSON here.
    """
    import ijson

    path = Path(path)
    try:
        with _open_source(path, what) as f:
            yield from ijson.items(f, prefix, use_float=True)
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except ijson.JSONError as exc:
        # yajl's message spans lines (it draws the position): keep its first line
        reason = (str(exc).strip().splitlines() or ["parse error"])[0]
        raise UserError(f"{path} is not valid JSON ({reason}): re-download or re-extract it") from None
