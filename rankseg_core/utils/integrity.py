"""Checksums carried inside checkpoints and weights files (`runs.py` writes and checks them).

A checkpoint (`torch.save` of plain data) holds one more entry, `"sha256"`: the SHA-256 of the
rest of its content -- every tensor's dtype, shape and bytes and every plain value, dict keys
in sorted order. `model.safetensors` holds the same digest of its tensors in the header's
metadata. A reader recomputes the digest from what it loaded and refuses a mismatch, so a
truncated, bit-flipped or foreign file is never used.

Why inside the file and not in a `last.pt.sha256` next to it: a file and its sidecar cannot
be replaced in one atomic step, so a crash between the two renames would leave a good
checkpoint that looks corrupt (or a sidecar that vouches for the previous file). Inside, the
one rename of the atomic write replaces both. The digest also travels with a copied file, and
the files stay what they were: `torch.load(weights_only=True)` and any safetensors reader
still read them. Why the content and not the bytes: a digest cannot cover the bytes it is
written into, and hashing what was loaded checks exactly what will be used.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

KEY = "sha256"  # the checkpoint entry / safetensors metadata key holding the digest


def content_digest(obj: Any) -> str:
    """SHA-256 (hex) of nested dicts / lists / tuples of tensors, str, int, float, bool, None.

    Every item is fed as (kind, length, bytes), so different structures never hash alike;
    lists and tuples hash alike (pickle may turn one into the other), dict order does not count.
    TypeError for anything else (a checkpoint holds plain data only).
    """
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _put(h: Any, kind: bytes, payload: bytes | memoryview) -> None:
    h.update(kind + len(payload).to_bytes(8, "little"))
    h.update(payload)


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        _put(h, b"T", f"{t.dtype}{tuple(t.shape)}".encode())
        # numpy's stubs give ndarray __buffer__ only for Python >= 3.12; it has the buffer protocol on all.
        _put(h, b"B", memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
    elif isinstance(obj, dict):
        _put(h, b"D", str(len(obj)).encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        _put(h, b"L", str(len(obj)).encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, str):
        _put(h, b"S", obj.encode("utf-8", "surrogatepass"))
    elif isinstance(obj, bool):  # before int: bool is an int
        _put(h, b"b", b"1" if obj else b"0")
    elif isinstance(obj, int):
        _put(h, b"i", str(obj).encode())
    elif isinstance(obj, float):
        _put(h, b"f", obj.hex().encode())
    elif obj is None:
        _put(h, b"N", b"")
    else:
        raise TypeError(f"cannot checksum a {type(obj).__name__}")


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """`state` plus its digest under KEY (what `save_checkpoint` writes)."""
    return {**state, KEY: content_digest(state)}


def unseal(state: Any) -> tuple[dict[str, Any], bool]:
    """(state without KEY, whether it carried a digest); ValueError when the digest does not
    match the content or `state` is not a dict of plain data."""
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a dictionary")
    if KEY not in state:
        return state, False
    rest = {k: v for k, v in state.items() if k != KEY}
    try:
        actual = content_digest(rest)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    if actual != state[KEY]:
        raise ValueError("its SHA-256 does not match the content")
    return rest, True


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (ValueError if the header is broken).

    The format: 8 bytes little-endian header length, then that many bytes of JSON."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("truncated (the header is longer than the file)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("its header is not valid JSON") from None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("its header is not a safetensors header")
    return meta
