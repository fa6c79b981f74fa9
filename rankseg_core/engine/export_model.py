"""`rankseg export-model`: a run's inference path as one TorchScript or ONNX file, checked
against the PyTorch model before it is written (docs/training.md, "Exporting a trained model").

What is exported (`ExportedSegmenter`), for ONE image size H x W fixed at export:

    images B x 3 x H x W uint8 RGB   (resized by the caller to H x W; no normalisation)
      -> normalised with the run's mean / std (baked in: the file cannot be fed wrongly scaled input)
      -> the model's forward with its trained selection: the top-kappa classes of the ml
         logits, in rank order (a static kappa: the trained one, or --kappa)
      -> the C selected channels' logits resized (bilinear, align_corners=False) to H x W
    outputs  labels   B x H x W int64    class id per pixel (argmax over the selected classes)
             classes  B x C int64        class id of each channel, rank order (the top-kappa)
             logits   B x C x H x W f32  the selected classes' logits at H x W (rank order)
             ml_probs B x K f32          sigmoid of the ml logits (models that rank only)

C = kappa for a selecting model, K (class order) for the Segmenter baseline / +MT. This is the
"whole" protocol at scale 1 without flip; slide windows, multi-scale and flip averaging are
not in the file. The batch size is dynamic in TorchScript (traced with 1, checked with 2) and
1 in ONNX (`_onnx_bytes`); the image size is fixed. H and W must be multiples of 32, so the backbones need no padding.

Refused in one line: GT oracles (they need ground-truth classes), frozen-selector runs (their
ranking model lives in another run), video runs (clips), models that do not segment, models
whose forward returns no per-pixel logits (Mask2Former: queries and masks, not SegOutput),
and models that select a different number of classes per image. A forward whose Python
control flow depends on the data would be frozen by the trace: every export is therefore run,
before it is written, on other images (and another batch size) than it was traced with and
compared with the PyTorch model, and refused when they differ; --out is written atomically and never over an input.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.config.train import TrainConfig
from rankseg_core.errors import UserError
from rankseg_core.families import family_of
from rankseg_core.families.base import InferenceProtocol
from rankseg_core.model.heads import SegOutput
from rankseg_core.model.selection import Selection, SelectionOptions
from rankseg_core.utils.fsio import atomic_write_bytes

FORMATS = ("torchscript", "onnx")
# Every backbone here (ViT patch 16, ResNet OS8, Swin / BEiT 32) divides 32: no padding needed.
SIZE_MULTIPLE = 32
ONNX_OPSET = 17
# Float32 on CPU: the exported graph and eager PyTorch differ by summation order only. Logits
# are LayerNorm outputs (order 1..10), so 1e-3 is far above that noise and far below a real error.
LOGIT_ATOL = 1e-3
PROB_ATOL = 1e-4
PARITY_BATCH = 2  # a second batch size than the trace's 1: the batch axis is proved dynamic


@dataclass(frozen=True)
class ExportResult:
    out: Path
    format: str
    size: tuple[int, int]
    kappa: int  # channels C of the outputs (K for a class-ordered model)
    outputs: tuple[str, ...]
    max_logit_diff: float  # exported vs eager, on the parity image(s)
    label_agreement: float  # fraction of pixels with the same label as the engine's `predict`


class ExportedSegmenter(nn.Module):
    """The whole inference path of one image size: uint8 B x 3 x H x W -> the outputs of the
    module docstring (a tuple, in `output_names` order)."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], num_classes: int,
                 kappa: int | None, ranks: bool) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.num_classes = num_classes
        self.selection = Selection(kappa=kappa)
        self.ranks = ranks

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("labels", "classes", "logits") + (("ml_probs",) if self.ranks else ())

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        h, w = images.shape[-2:]
        x = (images.float() - self.mean) / self.std
        out = self.model(x, self.selection)
        logits = F.interpolate(out.mask_logits.float(), size=(h, w), mode="bilinear", align_corners=False)
        b, c = logits.shape[:2]
        if out.topk_index is None:  # class-ordered channels (baseline / +MT)
            classes = torch.arange(c, device=logits.device)[None].expand(b, c)
        else:
            classes = out.topk_index
        labels = classes.gather(1, logits.argmax(1).flatten(1)).reshape(b, h, w)
        res: tuple[Tensor, ...] = (labels, classes, logits)
        if self.ranks:
            res = res + (out.ml_logits.float().sigmoid(),)
        return res


def parse_size(text: str) -> tuple[int, int]:
    """"512" or "512x683" (height x width) -> (H, W), each a positive multiple of 32."""
    parts = text.lower().split("x")
    try:
        hw = [int(p) for p in parts]
    except ValueError:
        hw = []
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < SIZE_MULTIPLE or any(v % SIZE_MULTIPLE for v in hw):
        raise UserError(f"--size {text}: give N or HxW, multiples of {SIZE_MULTIPLE} (e.g. 512 or 512x672); "
                        "resize your images to it")
    return hw[0], hw[1]


def check_exportable(cfg: TrainConfig) -> None:
    """UserError, in one line, for a run whose inference this export cannot reproduce."""
    m = cfg.model
    family = family_of(m.model)
    if not family.segments:
        raise UserError(f"{m.model} is a multi-label classifier: it does not segment; export a segmentation run")
    if m.oracle:
        raise UserError("this run is a GT (train + eval) oracle: it needs ground-truth classes at every forward and "
                        "cannot be exported")
    if m.has_selector:
        raise UserError(f"this run's classes are ranked by the frozen classifier run {m.selector.run}, which is not "
                        "part of its weights: export-model does not export two runs as one; export a run with its "
                        "own ml branch")
    if m.clip_len != 1 or family.instances(m):
        raise UserError(f"model.clip_len={m.clip_len}: a video run predicts clips, which export-model does not "
                        "export; export an image run")


def check_out(out: Path, run_dir: Path) -> None:
    """Refuse an --out that exists (never replaced) or lies inside the run directory (an input)."""
    if out.exists() or out.is_symlink():
        raise UserError(f"--out {out} exists: export-model never replaces a file; choose a new path or delete it")
    try:
        inside = Path(os.path.realpath(out)).is_relative_to(Path(os.path.realpath(run_dir)))
    except OSError:
        inside = False
    if inside:
        raise UserError(f"--out {out} is inside the run directory {run_dir}, an input; write the export elsewhere")


def parity_images(size: tuple[int, int], image: np.ndarray | None = None, batch: int = PARITY_BATCH) -> Tensor:
    """batch x 3 x H x W uint8: `image` (H' x W' x 3 RGB) resized to `size`, and synthetic
    images (smooth colour ramps plus seeded noise: a whole range of colours and edges)."""
    import cv2

    h, w = size
    rng = np.random.default_rng(0)
    out = []
    if image is not None:
        out.append(cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR))
    while len(out) < batch:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, 3)
        ramp = np.stack([127 + 100 * np.sin(xx / (7 + 5 * k) + yy / (11 + 3 * k) + phase[k]) for k in range(3)], -1)
        out.append(np.clip(ramp + rng.normal(0, 20, ramp.shape), 0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def _trace(wrapper: ExportedSegmenter, example: Tensor) -> torch.jit.ScriptModule:
    """torch.jit.trace of the wrapper on `example`. The tracer's warnings are silenced: here
    they flag comparisons of SHAPES (fixed at export, or the batch size, which the parity
    check varies), so they cannot tell data-dependent control flow from harmless checks;
    the parity check on other images and another batch size is what catches a frozen branch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(wrapper, example, check_trace=False)


def _argsort_as_topk(g: Any, x: Any, *args: Any) -> Any:
    """ONNX for `Tensor.argsort(dim, descending, stable=...)`, which `model/selection.py`
    ranks the classes with: TopK over the whole axis. ONNX's TopK breaks ties by the lower
    index first, which is what stable=True means; the stock exporter reads the stable
    overload's arguments one place off and fails."""
    from torch.onnx import symbolic_helper as sh

    dim, descending = (args[1], args[2]) if len(args) == 3 else (args[0], args[1])
    dim, descending = sh._maybe_get_const(dim, "i"), sh._maybe_get_const(descending, "b")
    size = g.op("Gather", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([dim], dtype=torch.int64)))
    return g.op("TopK", x, size, axis_i=dim, largest_i=int(descending), sorted_i=1, outputs=2)[1]


def _onnx_bytes(wrapper: ExportedSegmenter, example: Tensor, hint: str) -> bytes:
    """The ONNX file (the TorchScript-based exporter, which needs no onnxscript) of a batch of
    ONE: with a dynamic batch axis the exporter loses the feature map's static size, which the
    ml branch's adaptive pooling needs."""
    buf = io.BytesIO()
    torch.onnx.register_custom_op_symbolic("aten::argsort", _argsort_as_topk, ONNX_OPSET)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
            # A file object works (the TorchScript-based exporter writes to it); the stubs say paths only.
            torch.onnx.export(wrapper, (example[:1],), buf,  # type: ignore[arg-type]
                              input_names=["images"], output_names=list(wrapper.output_names),
                              opset_version=ONNX_OPSET, dynamo=False)
    except torch.onnx.errors.OnnxExporterError as exc:
        why = str(exc).split(". ")[0].split("[Caused")[0].strip()
        if "adaptive_avg_pool2d" in why:  # the ml branch's fixed pooled grid (model/heads.py)
            hint = ("the ml branch pools the patch grid to 8 x 8 (TranDec: 16 x 16), which ONNX needs as a divisor: "
                    "export a size whose patch grid is a multiple of it (e.g. 128 or 512), or ")
        raise UserError(f"--format onnx: {why}; {hint}use --format torchscript") from None
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::argsort", ONNX_OPSET)
    return buf.getvalue()


def _require_onnxruntime() -> Any:
    try:
        import onnxruntime  # type: ignore[import-untyped]
    except ImportError:
        raise UserError("--format onnx checks the file with onnxruntime, which is not installed: "
                        "pip install 'rankseg-toolkit[onnx]' (or use --format torchscript)") from None
    return onnxruntime


def _onnx_runner(data: bytes) -> Any:
    ort = _require_onnxruntime()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> tuple[Tensor, ...]:  # the file takes one image at a time (`_onnx_bytes`)
        outs = [sess.run(None, {"images": x[i:i + 1].numpy()}) for i in range(len(x))]
        return tuple(torch.cat([torch.from_numpy(np.asarray(o[j])) for o in outs]) for j in range(len(outs[0])))
    return run


def _torchscript_runner(data: bytes) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return lambda x: tuple(t.cpu() for t in loaded(x))


def engine_labels(model: nn.Module, cfg: TrainConfig, images: Tensor, mean: Tensor, std: Tensor,
                  kappa: int | None) -> Tensor:
    """The engine's own prediction of `images` (uint8 N x 3 x H x W) in the exported protocol
    (whole, scale 1, no flip): the family's `predict`, an independent path (class maps,
    softmax) from the export's argmax over ranked channels. -> N x H x W long."""
    family = family_of(cfg.model.model)
    x = (images.float() - mean) / std
    size = (int(images.shape[-2]), int(images.shape[-1]))
    res = family.predict(model, cfg, x, [size] * len(x), InferenceProtocol("whole", (1.0,), False),
                         Selection(kappa=kappa))
    assert res.semantic is not None  # a segmenting family (check_exportable)
    return torch.stack(res.semantic).cpu()


def compare(got: tuple[Tensor, ...], want: tuple[Tensor, ...], names: tuple[str, ...]) -> float:
    """Max |logit| difference of an exported model's outputs against eager ones; UserError when
    any output differs beyond the tolerances (labels may differ only where two channels are
    within LOGIT_ATOL of each other: a tie the two float paths may break differently)."""
    out = dict(zip(names, got))
    ref = dict(zip(names, want))
    if any(tuple(out[n].shape) != tuple(ref[n].shape) for n in names):
        raise UserError("the exported model's outputs have other shapes than the PyTorch model's: not written")
    if not torch.equal(out["classes"].long(), ref["classes"].long()):
        raise UserError("the exported model selects other classes than the PyTorch model: not written")
    diff = float((out["logits"] - ref["logits"]).abs().max())
    if diff > LOGIT_ATOL:
        raise UserError(f"the exported model's logits differ from the PyTorch model's by {diff:.3g} "
                        f"(tolerance {LOGIT_ATOL:g}): not written")
    if "ml_probs" in out and float((out["ml_probs"] - ref["ml_probs"]).abs().max()) > PROB_ATOL:
        raise UserError("the exported model's ml probabilities differ from the PyTorch model's: not written")
    top2 = ref["logits"].topk(min(2, ref["logits"].shape[1]), dim=1).values
    near_tie = (top2[:, 0] - top2[:, -1]) <= LOGIT_ATOL if top2.shape[1] > 1 else torch.zeros_like(top2[:, 0], dtype=torch.bool)
    bad = (out["labels"].long() != ref["labels"].long()) & ~near_tie
    if bool(bad.any()):
        raise UserError(f"the exported model labels {int(bad.sum())} pixels differently from the PyTorch model: "
                        "not written")
    return diff


def export_run(run_dir: str | Path, out: str | Path, fmt: str, size: str | None = None, kappa: int | None = None,
               weights: str = "auto", image: str | Path | None = None) -> ExportResult:
    """`rankseg export-model`: trace the run's inference path at one image size, compare the
    exported file with the PyTorch model on test images, then write it atomically to `out`."""
    from rankseg_core.engine.predict import read_image
    from rankseg_core.engine.runs import load_config, load_run

    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: use {' or '.join(FORMATS)}")
    SelectionOptions(kappa=kappa).check()
    check_out(out, run_dir)
    cfg = load_config(run_dir)
    check_exportable(cfg)
    family = family_of(cfg.model.model)
    if kappa is not None and not family.ranks(cfg.model):
        raise UserError(f"--kappa: this run ({family.describe(cfg.model)}) does not rank classes; drop --kappa")
    hw = parse_size(size) if size is not None else parse_size(str(cfg.model.img_size))
    picture = read_image(Path(image)) if image is not None else None
    if fmt == "onnx":
        _require_onnxruntime()  # before the slow load and trace

    model, cfg = load_run(run_dir, "cpu", weights)
    model.float()
    dc = family.data_config(model)
    mean = list(cfg.aug.mean or dc["mean"])  # what the test transform uses (data/augment.py)
    std = list(cfg.aug.std or dc["std"])
    probe = parity_images(hw, picture, 1)
    wrapper = ExportedSegmenter(model, mean, std, cfg.model.num_classes, kappa, False).eval()
    with torch.no_grad():
        raw = model((probe.float() - wrapper.mean) / wrapper.std, wrapper.selection)
    if not isinstance(raw, SegOutput):
        raise UserError(f"{cfg.model.model}: its forward returns {type(raw).__name__}, not per-pixel class logits "
                        "(SegOutput); export-model exports the Segmenter and conv families")
    if raw.valid is not None:
        raise UserError("this model selects a different number of classes per image; it cannot be exported")
    wrapper.ranks = raw.ml_logits is not None
    names = wrapper.output_names

    with torch.no_grad():
        traced = _trace(wrapper, probe)
        if fmt == "torchscript":
            buf = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch's deprecation note on TorchScript
                torch.jit.save(traced, buf)
            data = buf.getvalue()
            run = _torchscript_runner(data)
        else:
            hint = "" if hw == (cfg.model.img_size,) * 2 else \
                f"at a size other than model.img_size={cfg.model.img_size} the ViT resamples its position embeddings " \
                "with an operator ONNX lacks (give --size model.img_size), or "
            data = _onnx_bytes(wrapper, probe, hint)
            run = _onnx_runner(data)
        images = parity_images(hw, picture)
        want = wrapper(images)
        got = run(images)
        diff = compare(got, want, names)
        agree = float((got[0].long() == engine_labels(model, cfg, images, wrapper.mean, wrapper.std, kappa))
                      .float().mean())
    if agree < 0.999:
        raise UserError(f"the export's labels agree with `rankseg predict`'s on only {agree:.1%} of the test pixels: "
                        "this model's inference is not the exported protocol; not written")
    out.parent.mkdir(parents=True, exist_ok=True)
    check_out(out, run_dir)  # again: the trace takes a while
    atomic_write_bytes(out, data)
    return ExportResult(out, fmt, hw, int(want[1].shape[1]), names, diff, agree)

