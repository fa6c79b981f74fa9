"""Image and label encoding.

Labels are stored as 16-bit greyscale PNGs of train ids (65535 = ignore) because 255 is a
real class once K > 255 (ADE20K-Full, COCO+LVIS). OpenCV is used for both directions: it
round-trips uint16 PNGs exactly and is several times faster than PIL at PNG encode.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np

IGNORE = 65535  # stored ignore value; never 255 (a valid class id for K > 255)
MAX_CLASSES = IGNORE  # K <= 65535: train ids 0..65534, 65535 is the ignore value

# Largest image (or mask) rankseg decodes: 2^28 = 268,435,456 pixels (16384 x 16384). The
# biggest images of the supported datasets have a few megapixels, and at this size one decode
# already holds ~0.8 GB of BGR pixels (and a converter's int32 label 1 GB) per worker. Sizes are
# read from the PNG / JPEG header before decoding, so a decompression bomb never allocates.
# (OpenCV's own limit, CV_IO_MAX_IMAGE_PIXELS = 2^30, only warns and returns None.)
MAX_PIXELS = 1 << 28
# Largest image, mask or prediction file read whole (1 GiB): far above any encoded image at
# MAX_PIXELS that occurs in practice, and a bound on memory where a file is not what it seems.
MAX_FILE_BYTES = 1 << 30

# PNG compression 1 is ~3x faster to encode than the default 3 and only a few % larger on
# label maps, which are dominated by long runs. One row filter, "up", instead of libpng's
# per-row choice among all five: on ADE20K's label maps the files are ~1 % smaller, decoding
# takes ~0.7x the time (no Paeth / average rows to undo; decoding is a training worker's
# largest cost) and encoding ~0.35x (measured in docs/benchmarks.md, "Label PNG filter"). The
# decoded values are the same whatever the filter; OpenCV < 4.10 has no filter option and
# keeps libpng's choice.
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1] + (
    [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP] if hasattr(cv2, "IMWRITE_PNG_FILTER") else [])


# OpenCV >= 4.11 decodes straight to RGB (libjpeg-turbo writes the channels in that order; the
# same values as BGR then a channel swap, which costs a pass over the image); older OpenCV swaps.
_DECODES_RGB = hasattr(cv2, "IMREAD_COLOR_RGB")
_COLOR_FLAGS = (cv2.IMREAD_COLOR_RGB if _DECODES_RGB else cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION


def encode_label(label: np.ndarray) -> bytes:
    """Encode an H x W uint16 label map as PNG bytes."""
    if label.dtype != np.uint16 or label.ndim != 2:
        raise ValueError(f"label must be a 2-D uint16 array, got {label.dtype} {label.shape}")
    ok, buf = cv2.imencode(".png", label, _PNG_PARAMS)
    if not ok:  # pragma: no cover - cv2 only fails on invalid input, excluded above
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def decode_label(data: bytes | np.ndarray) -> np.ndarray:
    """Decode PNG bytes into an H x W uint16 label map (raises ValueError if corrupt or too large)."""
    arr = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else data
    check_pixel_limit(arr, "label")
    label = cv2.imdecode(arr, cv2.IMREAD_UNCHANGED)
    if label is None or label.ndim != 2:
        raise ValueError("not a single-channel PNG label")
    return label.astype(np.uint16, copy=False)


def encode_jpeg(image_rgb: np.ndarray, quality: int = 90) -> bytes:
    """Encode an H x W x 3 uint8 RGB image as JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
    """Decode image bytes into an H x W x 3 uint8 RGB array.

    Raises ValueError if corrupt, or larger than MAX_PIXELS (checked on the header first).
    """
    arr = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else data
    if arr.size == 0:
        raise ValueError("empty image (0 bytes)")
    if check_pixel_limit(arr) is None:
        _probe_other_format(arr)
    # Masks are drawn on the stored pixel grid: an EXIF rotation would turn the image against them.
    img = cv2.imdecode(arr, _COLOR_FLAGS)
    if img is None:
        raise ValueError("corrupt or unsupported image")
    check_size(img.shape[0], img.shape[1], "image")
    return img if _DECODES_RGB else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) of encoded image bytes: from the PNG / JPEG header, else by decoding."""
    size = header_size(data)
    if size is not None:
        return size
    img = decode_image(data)
    return int(img.shape[0]), int(img.shape[1])


# --- pixel limit ----------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic ...): they carry the size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(buf: memoryview) -> tuple[int, int] | None:
    """(height, width) from the first SOF segment, walking the marker segments by their lengths."""
    i, n = 2, len(buf)
    while i + 4 <= n:
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker in (0xD9, 0xDA):  # end of image / start of scan before any SOF
            return None
        elif marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            return int.from_bytes(buf[i + 5:i + 7], "big"), int.from_bytes(buf[i + 7:i + 9], "big")
        else:
            i += 2 + int.from_bytes(buf[i + 2:i + 4], "big")
    return None


def header_size(data: bytes | np.ndarray) -> tuple[int, int] | None:
    """(height, width) read from a PNG (IHDR) or JPEG (SOF) header without decoding; None for
    other formats or an unreadable header."""
    # numpy's stubs give ndarray __buffer__ only for Python >= 3.12; it has the buffer protocol on all.
    buf = memoryview(data).cast("B") if isinstance(data, np.ndarray) else memoryview(data)  # type: ignore[arg-type]
    if bytes(buf[:8]) == _PNG_SIGNATURE and len(buf) >= 24 and bytes(buf[12:16]) == b"IHDR":
        return int.from_bytes(buf[20:24], "big"), int.from_bytes(buf[16:20], "big")
    if bytes(buf[:2]) == b"\xff\xd8":
        return _jpeg_size(buf)
    return None


def check_size(h: int, w: int, what: str = "image") -> None:
    """ValueError when h x w exceeds MAX_PIXELS."""
    if h * w > MAX_PIXELS:
        raise ValueError(f"{what} is {w}x{h} (W x H) = {h * w:,} pixels, over rankseg's limit of "
                         f"{MAX_PIXELS:,} (a decompression bomb or a corrupt header)")


def check_pixel_limit(data: bytes | np.ndarray, what: str = "image") -> tuple[int, int] | None:
    """Raise ValueError when the PNG / JPEG header claims more than MAX_PIXELS pixels.

    Returns the header's (height, width), or None when the format has no header read here.
    """
    size = header_size(data)
    if size is not None:
        check_size(size[0], size[1], what)
    return size


def _probe_other_format(arr: np.ndarray) -> None:
    """Header size of formats other than PNG / JPEG (BMP, WebP, TIFF ...) via PIL's lazy open.

    Unidentified data is left to OpenCV (which fails on it, or is bounded by its own 2^30 limit
    and the check after decoding).
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(arr.tobytes())) as im:
                w, h = im.size
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image over the pixel limit ({exc})") from None
    except Exception:  # noqa: BLE001 - PIL cannot read this header: OpenCV decides below
        return
    check_size(h, w, "image")


def class_counts(label: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Present train ids (sorted, uint16) and their pixel counts (int64) in a uint16 label.

    Raises ValueError when a value is neither a train id < num_classes nor IGNORE.
    """
    counts = np.bincount(label.ravel(), minlength=num_classes)
    bad = np.nonzero(counts[num_classes:])[0]
    bad = bad[bad + num_classes != IGNORE]
    if bad.size:
        raise ValueError(f"label value {int(bad[0]) + num_classes} is >= K={num_classes} and not ignore ({IGNORE})")
    present = np.nonzero(counts[:num_classes])[0]
    return present.astype(np.uint16), counts[present].astype(np.int64)
