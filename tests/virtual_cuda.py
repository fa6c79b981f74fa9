"""A CUDA device emulated on the CPU, for tests: the device placement a GPU run needs, checked
on a machine without one.

Why: on a GPU, an op that meets tensors of two devices raises ("Expected all tensors to be on
the same device"), and `.numpy()` of a device tensor raises; on a CPU-only machine every
tensor is on the CPU and neither can happen, so a CPU test suite cannot see such bugs.

How, inside `with virtual_cuda():`
- tensors made for "cuda" (a factory's `device=`, `.to(...)`, `.cuda()`) are ordinary CPU
  tensors that are remembered by storage and report cuda:0 (`Tensor.device`, `.is_cuda`,
  `.is_cpu`, `.get_device()`); `.cpu()` / `.to("cpu")` of one is a copy that is a CPU tensor
  again, and `.numpy()` of one raises as on a GPU;
- every op runs for real on the CPU, AND on FakeTensors of the same shapes on those devices
  (`torch._subclasses.FakeTensorMode`, which fakes a CUDA device without one): PyTorch's own
  device rules (a CPU 0-dim tensor may join CUDA tensors as a scalar, index tensors may stay
  on the CPU, any other mix raises) say whether the op would run on a GPU (else
  `DeviceMismatch`, naming the op and the rankseg_core line) and where its outputs live. Ops
  whose output shape depends on values (nonzero, unique, `.item()`) cannot run on FakeTensors:
  they get the basic rule (every input of one or more dimensions on one device, index tensors
  excepted) and their outputs go to their inputs' device, as on a GPU; `checked` / `unchecked`
  count both kinds;
- `torch.cuda.is_available()` and `torch.accelerator.is_available()` say yes, so the code under
  test takes its CUDA branches (`--device auto` / `cuda`, the DataLoader's pinned batches, with
  workers through its pin thread, AMP); pinning is a host copy, the device's random state a
  placeholder, and CUDA autocast is made by the CPU's autocast with the same dtype (bf16, or
  fp16 with `virtual_cuda(bf16=False)`).
What it cannot see: the numbers a GPU kernel would give, streams and synchronisation (the
host-sync tests watch those), the CUDA runtime's own calls (memory statistics), and where CUDA
autocast's op lists differ from the CPU's (the CPU's keeps `layer_norm` in bf16). PyTorch
functions written in C++ out of other ops that make a tensor "like" their input get the input's
real device (the CPU) for it: the ones this project calls are listed in `_COMPOSITES`.
"""

from __future__ import annotations

import sys
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
_REAL_DEVICE = torch._C.TensorBase.device  # the getter of the tensor's real device (always cpu here)


# The storages of the emulated device's tensors, by address, for the whole test session: a
# tensor a cache kept from an earlier block (data/device.py's normalisation constants) is on the
# device in the next one, as in a real GPU process.
_ON_CUDA: dict[int, weakref.finalize] = {}


class DeviceMismatch(AssertionError):
    """An op that would raise on a GPU: it meets tensors of two devices."""


def _site() -> str:
    """The innermost rankseg_core line of the current call (torch internals are attributed to
    the rankseg line that called them)."""
    f: Any = sys._getframe(2)
    while f is not None and "/rankseg_core/" not in f.f_code.co_filename:
        f = f.f_back
    if f is None:
        return "outside rankseg_core"
    return f"{f.f_code.co_filename.split('/rankseg_core/')[-1]}:{f.f_lineno} ({f.f_code.co_name})"


def _virtual(device: Any) -> torch.device:
    d = torch.device(device)
    return CUDA if d.type == "cuda" else d


class _FakeCuda(FakeTensorMode):
    """FakeTensors on a CUDA device that is not there, even while `torch.cuda.is_available()`
    is patched to say it is (FakeTensorMode would then use the real CUDA device guard)."""

    @property
    def avoid_device_init(self) -> bool:
        return True


class VirtualCuda(TorchDispatchMode):
    """The dispatch mode behind `virtual_cuda` (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.fake = _FakeCuda()
        self.checked, self.unchecked = 0, Counter[str]()
        self.moving: torch.device | None = None  # the target of the copy `Tensor.to` is making
        self.inside_composite = False
        self.bf16 = True
        self.autocast = False  # whether the code under test turned CUDA autocast on

    @staticmethod
    def _key(t: torch.Tensor) -> int | None:
        try:
            return t.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError):  # a tensor without a storage of its own
            return None

    def device_of(self, t: torch.Tensor) -> torch.device:
        real = _REAL_DEVICE.__get__(t)
        if real.type != "cpu":
            return real
        return CUDA if self._key(t) in _ON_CUDA else CPU

    def _tag(self, out: Any, devices: list[torch.device] | torch.device) -> None:
        """Record where the op's output tensors live: `devices` one per tensor, or one for all."""
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for t, d in zip(tensors, devices if isinstance(devices, list) else [devices] * len(tensors), strict=True):
            k = self._key(t)
            if k is None:
                continue
            if d.type == "cuda":
                if k not in _ON_CUDA:
                    # (a storage's Python object lives exactly as long as the storage: the
                    # entry goes with it, before its address can be reused)
                    _ON_CUDA[k] = weakref.finalize(t.untyped_storage(), _ON_CUDA.pop, k, None)
            elif (gone := _ON_CUDA.pop(k, None)) is not None:
                gone.detach()

    def _fake_devices(self, func: Any, args: Any, kwargs: Any, devices: list[torch.device]
                      ) -> list[torch.device] | torch.device:
        """The op's output devices by FakeTensor's rules; raises DeviceMismatch where they say
        the op would fail on a GPU."""
        flat, spec = tree_flatten((args, kwargs))
        it = iter(devices)
        with self.fake:
            fakes = [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=next(it))
                     if isinstance(x, torch.Tensor) else x for x in flat]
            fargs, fkwargs = tree_unflatten(fakes, spec)
            try:
                out = func(*fargs, **fkwargs)
            except RuntimeError as exc:
                msg = str(exc).splitlines()[0]
                low = msg.lower()  # FakeTensor's own words for it: "same device", "Mismatching ... device"
                if "device" in low and ("same device" in low or "mismatch" in low):
                    raise DeviceMismatch(f"{func} at {_site()}: {msg}") from None
                return self._fallback(func, args, kwargs)
            except Exception:  # noqa: BLE001  values needed (nonzero, .item()), or no fake kernel
                return self._fallback(func, args, kwargs)
        self.checked += 1
        return [t.device for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]

    def _fallback(self, func: Any, args: Any, kwargs: Any) -> torch.device:
        """An op FakeTensors cannot run (its output shape depends on values): PyTorch's basic
        rule, every input tensor of more than 0 dimensions on one device (index tensors may
        stay on the CPU); its outputs are there."""
        self.unchecked[str(func)] += 1
        named = list(zip((a.name for a in func._schema.arguments), args)) + list(kwargs.items())
        seen = {self.device_of(t) for name, v in named if name != "indices"
                for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(seen) > 1:
            raise DeviceMismatch(f"{func} at {_site()}: tensors on {sorted(map(str, seen))}")
        every = {self.device_of(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        return CUDA if CUDA in (seen or every) else CPU

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if self.inside_composite:  # PyTorch's own steps of a wrapped composite (`_COMPOSITES`)
            return func(*args, **kwargs)
        devices = [self.device_of(x) for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        if kwargs.get("device") is not None:
            # "cuda" can only come from the code under test (every real device is the CPU); a
            # "cpu" next to tensor inputs is PyTorch filling in the input's (real) device, as
            # `.to(dtype)` does, unless it is a move that `to` below started.
            target = _virtual(kwargs["device"])
            if self.moving is not None:
                target, self.moving = self.moving, None
            elif target.type == "cpu" and devices:
                target = devices[0]
            kwargs["device"] = CPU
            out = func(*args, **kwargs)
            self._tag(out, target)
            return out
        out_devices: list[torch.device] | torch.device = CPU  # host work (or no tensor input): nothing to check
        if any(d.type != "cpu" for d in devices):
            out_devices = self._fake_devices(func, args, kwargs, devices)
        out = func(*args, **kwargs)
        self._tag(out, out_devices)
        return out


# PyTorch functions made of other ops in C++ that build a new tensor "like" their input (its
# options, hence its real device: the CPU), which the mode would see made for the CPU. They run
# unchecked inside (PyTorch's own code) and their outputs go where their first tensor input is,
# as on a GPU. A DeviceMismatch inside another such function names it: add it here.
_COMPOSITES = [(torch.nn.functional, "one_hot"), (torch.nn.utils.rnn, "pad_sequence")]


def _on_input_device(mode: VirtualCuda, fn: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        mode.inside_composite = True
        try:
            out = fn(*args, **kwargs)
        finally:
            mode.inside_composite = False
        mode._tag(out, mode.device_of(inputs[0]) if inputs else CPU)
        return out

    return call


@contextmanager
def virtual_cuda(bf16: bool = True) -> Iterator[VirtualCuda]:
    """Run the block with "cuda" emulated on the CPU (module docstring); `bf16`: whether the
    emulated GPU has bfloat16 (else AMP runs float16 with a GradScaler). Tensors made before
    the block stay CPU tensors; move models and batches inside it. Everything is undone at
    the block's end."""
    mode = VirtualCuda()
    mode.bf16 = bf16
    lift = torch._C._only_lift_cpu_tensors()
    # torch.tensor(data, device=...) then builds on the CPU and moves through the dispatcher
    # (as FakeTensorMode has it), instead of allocating on the device directly.
    torch._C._set_only_lift_cpu_tensors(True)
    try:
        with pytest.MonkeyPatch.context() as mp, mode:
            _patch(mp, mode)
            yield mode
    finally:
        torch._C._set_only_lift_cpu_tensors(lift)


def _patch(monkeypatch: pytest.MonkeyPatch, mode: VirtualCuda) -> None:
    """The Python side of the emulation: devices reported, moves and `.numpy()`, for the
    real CPU tensors (FakeTensors, which the check itself and PyTorch's decompositions use,
    keep their own methods)."""

    def real(t: torch.Tensor) -> bool:
        return not isinstance(t, FakeTensor) and _REAL_DEVICE.__get__(t).type == "cpu"

    monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: None)  # factories reach the mode
    # The code under test takes its CUDA branches (`--device auto` / `cuda` resolve to cuda:0);
    # the device's random state is not emulated (a checkpoint stores a placeholder).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: None)
    # Mixed precision: CUDA autocast's casts are made by the CPU's autocast (the same lower-
    # precision dtype; its op lists differ in details), bf16 unless the block asks for fp16.
    real_autocast = torch.autocast

    def autocast(device_type: str, *args: Any, **kwargs: Any) -> Any:
        if device_type == "cuda":
            mode.autocast |= kwargs.get("enabled", True) is not False
            device_type = "cpu"
        return real_autocast(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: mode.bf16)
    # The DataLoader pins its batches (in its pin thread, with workers) where an accelerator is.
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.accelerator, "set_device_index", lambda i: None)
    # (an optimizer on CUDA parameters asks whether a CUDA graph is being captured)
    monkeypatch.setattr(torch.optim.Optimizer, "_accelerator_graph_capture_health_check", lambda self: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=None: SimpleNamespace(
        name="virtual CUDA device (tests/virtual_cuda.py)", total_memory=0, major=9, minor=0))
    real_to = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not real(self):
            return real_to(self, *args, **kwargs)
        if args and isinstance(args[0], torch.Tensor):  # .to(other): its device and dtype
            other, rest = args[0], args[1:]
            device, dtype = mode.device_of(other), other.dtype
            non_blocking = rest[0] if rest else kwargs.get("non_blocking", False)
            copy = rest[1] if len(rest) > 1 else kwargs.get("copy", False)
            memory_format = kwargs.get("memory_format", torch.preserve_format)
        else:  # (PyTorch's own parser, which takes every form but `copy`: the last positional)
            kwargs = dict(kwargs)
            copy = bool(kwargs.pop("copy", False))
            try:
                device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
            except RuntimeError:
                device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args[:-1], **kwargs)
                copy = copy or bool(args[-1])
            memory_format = memory_format or torch.preserve_format
        dtype = dtype or self.dtype
        if device is None or _virtual(device) == mode.device_of(self):
            return real_to(self, device=CPU, dtype=dtype, non_blocking=non_blocking, copy=copy,
                           memory_format=memory_format)
        mode.moving = _virtual(device)
        try:
            return torch.ops.aten._to_copy.default(self, dtype=dtype, device=mode.moving,
                                                   non_blocking=non_blocking, memory_format=memory_format)
        finally:
            mode.moving = None

    real_numpy, real_pin = torch.Tensor.numpy, torch.Tensor.pin_memory

    def numpy(self: torch.Tensor, *, force: bool = False) -> Any:
        if real(self) and mode.device_of(self).type == "cuda":
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")
        return real_numpy(self, force=force)

    for owner, name in _COMPOSITES:
        monkeypatch.setattr(owner, name, _on_input_device(mode, getattr(owner, name)))
    # Page-locked memory needs a driver: a host copy stands in (from the DataLoader's pin
    # thread too, where the mode is not active), so the loader's CUDA path runs.
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, device=None:
                        self.clone() if real(self) else real_pin(self, device))
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, memory_format=torch.preserve_format:
                        to(self, CPU, memory_format=memory_format))
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, device=None, non_blocking=False, **k:
                        to(self, CUDA, non_blocking=non_blocking))
    monkeypatch.setattr(torch.Tensor, "numpy", numpy)

    def device(t: torch.Tensor) -> torch.device:
        return mode.device_of(t) if real(t) else _REAL_DEVICE.__get__(t)

    monkeypatch.setattr(torch.Tensor, "device", property(device))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: device(t).type == "cuda"))
    monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda t: device(t).type == "cpu"))
    monkeypatch.setattr(torch.Tensor, "get_device", lambda t: 0 if device(t).type == "cuda" else -1)
