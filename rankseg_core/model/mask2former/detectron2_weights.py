"""detectron2 checkpoints for the Mask2Former family: backbones and whole official models.

Files (what detectron2's `DetectionCheckpointer._load_file` reads):
- `.pkl`: a pickle of {"model": {name: numpy array}, "__author__": ..., maybe
  "matching_heuristics"} (the detectron2 / Mask2Former / MaskFormer model zoos, detectron2's
  `convert-torchvision-to-d2.py` R-50.pkl, Mask2Former's `convert-pretrained-swin-model-to-d2.py`,
  whose values are torch tensors), or, without "model" / "__author__", a Caffe2 / Detectron1
  file (MSRA's ImageNet `R-50.pkl`: {name: array}, detection models under "blobs"). Read by a
  restricted unpickler that builds numpy arrays, torch tensors (through `weights_only` torch
  loading) and OrderedDicts and refuses every other global in one line: a pickle can call any
  function, a weights file needs none.
- `.pth` / `.pt`: a torch checkpoint, its state dict under "model" (a detectron2 training
  run's `model_final.pth`), read with `torch.load(weights_only=True)`.

Names: each official layout maps to ours through a table of prefix pairs (`Rename`), used in
both directions; `{i}` fields match a number, `{i+1}` shifts it (detectron2's `res2` is timm's
`layer1`, the original Swin release's `layers.0.downsample` is timm's `layers.1.downsample`).
- ResNet (detectron2 `build_resnet_backbone`): `stem.conv1[.norm]`, `res{2..5}.{b}.conv{1..3}
  [.norm]`, `.shortcut[.norm]` -> timm `conv1` / `bn1`, `layer{1..4}.{b}.conv{c}` / `bn{c}`,
  `downsample.{0,1}`; Caffe2 names (`res2_0_branch2a_w`, `res_conv1_bn_s`, ...) are renamed to
  those first, as detectron2's `convert_basic_c2_names` does for backbones.
- Swin (Mask2Former's `D2SwinTransformer`): the original release's names plus one LayerNorm
  per output, `norm{i}` -> our `out_norms.{i}`.
- Heads: Mask2Former's `sem_seg_head.pixel_decoder.*` (MSDeformAttnPixelDecoder) and
  `sem_seg_head.predictor.*` (MultiScaleMaskedTransformerDecoder), MaskFormer's
  (BasePixelDecoder / TransformerEncoderPixelDecoder, TransformerPredictor), and the RankSeg
  fork's `ml_head.*` / `ml_norm.*`, which are named as ours.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch._utils
from torch import Tensor, nn

from rankseg_core.errors import UserError
from rankseg_core.utils.fsio import open_regular, os_error

# Largest checkpoint read: 16 GiB, far above any official model (Swin-L Mask2Former is under
# 1 GiB); a bound on memory should the file not be what it seems.
MAX_CHECKPOINT_BYTES = 1 << 34
CAFFE2 = "Caffe2"  # the author detectron2 gives a file without "model" / "__author__"
# Not weights of a model: non-persistent buffers of timm's Swin, BN step counters, the input
# normalisation (our data config) and the loss's class weights (criterion.empty_weight).
_SKIPPED_SUFFIXES = ("relative_position_index", "attn_mask", "num_batches_tracked")
_SKIPPED_NAMES = ("pixel_mean", "pixel_std")
_SKIPPED_PREFIXES = ("criterion.",)
# The pretraining head of backbone files: the classifier (torchvision-converted: stem.fc; MSRA:
# fc1000; Swin: head) and the original Swin's final norm, none of which a pyramid has.
_CLASSIFIER_PREFIXES = ("stem.fc.", "fc1000.", "fc.", "head.", "norm.")


# ---------------------------------------------------------------------------------------
# Reading a file


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles from Python 3 use it for bytes (numpy's array
    data); only the latin-1 round trip, nothing else a codec could do."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _storage_from_bytes(data: bytes) -> Any:
    """torch's `torch.storage._load_from_bytes` (a tensor pickled with plain pickle keeps its
    storage as torch.save bytes), but through torch's own weights-only loader."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object for every global a weights pickle needs. numpy's private
    reconstruction functions are taken from what numpy's own reducers return (numpy 1 pickles
    name `numpy.core`, numpy 2 `numpy._core`: both are accepted, neither module is imported)."""
    array = np.zeros(1)
    reconstruct = array.__reduce__()[0]
    frombuffer = array.__reduce_ex__(5)[0]
    scalar = np.float32(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("collections", "OrderedDict")] = OrderedDict
    allowed[("_codecs", "encode")] = _latin1_encode
    allowed[("torch._utils", "_rebuild_tensor_v2")] = torch._utils._rebuild_tensor_v2
    allowed[("torch.storage", "_load_from_bytes")] = _storage_from_bytes
    return allowed


_ALLOWED = _allowed_globals()


class _WeightsUnpickler(pickle.Unpickler):
    """An unpickler that can only build arrays, tensors and (ordered) dicts.

    Every global a pickle names goes through `find_class`; anything outside `_ALLOWED`
    (os.system, builtins.eval, ...) ends the load with a UserError naming the file before it is
    called. `encoding="latin1"`: Python 2 pickles (Caffe2's MSRA files) hold array bytes as str.
    """

    def __init__(self, file: Any, path: Path, option: str) -> None:
        super().__init__(file, encoding="latin1")
        self.path, self.option = path, option

    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise UserError(f"{self.option}: {self.path} names the global {module}.{name}, which no weights file "
                            "needs; refused without running it (only numpy arrays, torch tensors and dicts are read)")
        return obj


@dataclass
class Detectron2File:
    """A detectron2 checkpoint read: its tensors (detectron2's names, "module." removed) and
    its author ("Caffe2" for a Caffe2 / Detectron1 file, "" when the file names none)."""

    path: Path
    tensors: dict[str, Tensor]
    author: str

    @property
    def caffe2(self) -> bool:
        return self.author == CAFFE2


def _as_tensor(value: Any, name: str, path: Path, option: str) -> Tensor:
    """A numpy array / scalar or a tensor as a CPU tensor; UserError for anything else."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        raise UserError(f"{option}: {path} holds a {type(value).__name__} under {name!r}, not an array of numbers; "
                        "is it a weights file?")
    if not value.dtype.isnative:
        value = value.astype(value.dtype.newbyteorder("="))
    # writable + contiguous: torch.from_numpy shares memory and warns on read-only buffers
    return torch.from_numpy(np.require(value, requirements=["C", "W", "A"]))


def _read_file(path: Path, option: str) -> Any:
    """The object a checkpoint file holds: a torch zip file (recognised by its magic bytes,
    whatever its suffix) through `torch.load(weights_only=True)`, anything else through the
    restricted unpickler. The file must be regular and at most MAX_CHECKPOINT_BYTES."""
    kind = "pickle"
    try:
        with open_regular(path, f"{option} file", lambda m: UserError(f"{option}: {m}")) as f:
            size = f.seek(0, io.SEEK_END)
            if size > MAX_CHECKPOINT_BYTES:
                raise UserError(f"{option}: {path} is {size:,} bytes, over rankseg's limit of "
                                f"{MAX_CHECKPOINT_BYTES:,} bytes: check that this is the right file")
            f.seek(0)
            if f.read(4) == b"PK\x03\x04":
                kind = "torch"
                f.seek(0)
                return torch.load(f, map_location="cpu", weights_only=True)
            f.seek(0)
            return _WeightsUnpickler(f, path, option).load()
    except UserError:
        raise
    except OSError as exc:
        raise os_error(path, exc, "cannot read") from None
    except Exception as exc:  # noqa: BLE001 - truncated / foreign files raise many types
        if kind == "torch":  # weights_only refuses pickled objects (an optimizer's, a config's)
            raise UserError(f"{option}: {path} is corrupt or holds more than weights ({exc.__class__.__name__}); "
                            "save its state dict alone: torch.save(torch.load(f)['model'], 'model.pth')") from None
        raise UserError(f"{option}: {path} is corrupt or not a detectron2 .pkl ({exc.__class__.__name__}); give "
                        "the checkpoint as downloaded from the model zoo") from None


def read_detectron2(path: str | Path, option: str = "weights") -> Detectron2File:
    """Read a detectron2 checkpoint as detectron2 does, without running anything it names.

    A torch zip file (any suffix) is read with `torch.load(weights_only=True)`, anything else
    with the restricted unpickler. `option` names the setting the file came from in errors
    ("backbone_weights", "--init-from"). UserError for a missing / non-regular / oversized
    file, a refused global, a corrupt file or values that are not arrays of numbers.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{option}: file {path} not found; give a local detectron2 checkpoint (.pkl / .pth), "
                        "weights are never downloaded")
    data = _read_file(path, option)
    if not isinstance(data, dict):
        raise UserError(f"{option}: {path} holds a {type(data).__name__}, not a detectron2 checkpoint (a dict)")
    if "model" in data and isinstance(data["model"], dict):
        model, author = data["model"], str(data.get("__author__", ""))
    elif path.suffix == ".pkl":  # Caffe2 / Detectron1 (detectron2's _load_file): the blobs themselves
        model, author = data.get("blobs", data), CAFFE2
        model = {k: v for k, v in model.items() if not str(k).endswith("_momentum")}
    else:
        model, author = data, ""
    tensors = {str(k).removeprefix("module."): _as_tensor(v, str(k), path, option) for k, v in model.items()}
    if not tensors:
        raise UserError(f"{option}: {path} holds no weights")
    return Detectron2File(path, tensors, author)


# ---------------------------------------------------------------------------------------
# Renaming


_FIELD = re.compile(r"\{(\w+)(?:\+(\d+))?\}")


@lru_cache(maxsize=None)
def _pattern(template: str) -> tuple[re.Pattern[str], tuple[tuple[str, int], ...]]:
    """A template's regex (numbers for its fields; a prefix if it ends with ".", else the
    whole name) and its (field, offset) pairs in order."""
    regex, fields, pos = "", [], 0
    for m in _FIELD.finditer(template):
        regex += re.escape(template[pos:m.start()]) + r"(\d+)"
        fields.append((m.group(1), int(m.group(2) or 0)))
        pos = m.end()
    regex += re.escape(template[pos:]) + ("" if template.endswith(".") else "$")
    return re.compile(regex), tuple(fields)


def _rewrite(src: str, dst: str, name: str) -> str | None:
    """`name` with its `src` prefix replaced by `dst` (fields carried over), or None."""
    pattern, fields = _pattern(src)
    m = pattern.match(name)
    if m is None:
        return None
    values: dict[str, int] = {}
    for (field, offset), text in zip(fields, m.groups()):
        v = int(text) - offset
        if v < 0 or values.setdefault(field, v) != v:
            return None
    return _FIELD.sub(lambda f: str(values[f.group(1)] + int(f.group(2) or 0)), dst) + name[m.end():]


@dataclass(frozen=True)
class Rename:
    """One name rule: `official` <-> `ours`, both prefix templates (or whole names when they
    do not end with "."). Fields: `{i}` is a number, `{i+1}` that number plus one on its side."""

    official: str
    ours: str

    def to_ours(self, name: str) -> str | None:
        return _rewrite(self.official, self.ours, name)

    def to_official(self, name: str) -> str | None:
        return _rewrite(self.ours, self.official, name)

    def under(self, official_prefix: str, our_prefix: str) -> Rename:
        return Rename(official_prefix + self.official, our_prefix + self.ours)


Rules = Sequence[Rename]


def rename(name: str, rules: Rules, to_ours: bool = True) -> str | None:
    """The name after the first rule that matches (order matters: specific rules first)."""
    for rule in rules:
        out = rule.to_ours(name) if to_ours else rule.to_official(name)
        if out is not None:
            return out
    return None


# detectron2's ResNet (backbone-relative names) -> PyramidBackbone (timm resnet in `body`).
RESNET_RULES: tuple[Rename, ...] = (
    Rename("stem.conv1.norm.", "body.bn1."),
    Rename("stem.conv1.", "body.conv1."),
    Rename("res{s+1}.{b}.conv{c}.norm.", "body.layer{s}.{b}.bn{c}."),
    Rename("res{s+1}.{b}.conv{c}.", "body.layer{s}.{b}.conv{c}."),
    Rename("res{s+1}.{b}.shortcut.norm.", "body.layer{s}.{b}.downsample.1."),
    Rename("res{s+1}.{b}.shortcut.", "body.layer{s}.{b}.downsample.0."),
)

# D2SwinTransformer (the original release's names + output norms) -> PyramidBackbone.
SWIN_RULES: tuple[Rename, ...] = (
    Rename("norm{i}.", "out_norms.{i}."),
    # The original Swin merges patches at the END of stage i, timm at the start of stage i + 1.
    Rename("layers.{i}.downsample.", "body.layers.{i+1}.downsample."),
    Rename("layers.", "body.layers."),
    Rename("patch_embed.", "body.patch_embed."),
)

_PD, _PR = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."

# Mask2Former: MSDeformAttnPixelDecoder + MultiScaleMaskedTransformerDecoder (+ the fork's ml head).
MASK2FORMER_HEAD_RULES: tuple[Rename, ...] = (
    Rename(_PD + "transformer.level_embed", "pixel_decoder.level_embed"),
    Rename(_PD + "transformer.encoder.layers.", "pixel_decoder.layers."),
    Rename(_PD + "input_proj.", "pixel_decoder.input_proj."),
    # One FPN level (res2): adapter_1 / layer_1 are detectron2 Conv2d's with a GroupNorm `norm`.
    Rename(_PD + "adapter_1.norm.", "pixel_decoder.lateral_norm."),
    Rename(_PD + "adapter_1.", "pixel_decoder.lateral_conv."),
    Rename(_PD + "layer_1.norm.", "pixel_decoder.output_norm."),
    Rename(_PD + "layer_1.", "pixel_decoder.output_conv."),
    Rename(_PD + "mask_features.", "pixel_decoder.mask_features."),
    Rename(_PR + "transformer_self_attention_layers.", "decoder.self_layers."),
    Rename(_PR + "transformer_cross_attention_layers.", "decoder.cross_layers."),
    Rename(_PR + "transformer_ffn_layers.", "decoder.ffn_layers."),
    Rename(_PR + "class_embed.", "class_embed."),
    # decoder_norm, query_feat, query_embed, level_embed, input_proj, mask_embed
    Rename(_PR, "decoder."),
    Rename("ml_head.", "ml_head."),
    Rename("ml_norm.", "ml_norm."),
)

_ENC, _DEC = _PD + "transformer.encoder.layers.{j}.", _PR + "transformer.decoder.layers.{j}."

# MaskFormer: BasePixelDecoder (layer_4 on res5, adapter_i / layer_i on res2..res4) or
# TransformerEncoderPixelDecoder (+ input_proj and a DETR encoder on res5), TransformerPredictor.
MASKFORMER_HEAD_RULES: tuple[Rename, ...] = (
    Rename(_PD + "layer_4.norm.", "pixel_decoder.top.1."),
    Rename(_PD + "layer_4.", "pixel_decoder.top.0."),
    Rename(_PD + "adapter_{i+1}.norm.", "pixel_decoder.laterals.{i}.1."),
    Rename(_PD + "adapter_{i+1}.", "pixel_decoder.laterals.{i}.0."),
    Rename(_PD + "layer_{i+1}.norm.", "pixel_decoder.outputs.{i}.1."),
    Rename(_PD + "layer_{i+1}.", "pixel_decoder.outputs.{i}.0."),
    Rename(_PD + "mask_features.", "pixel_decoder.mask_features."),
    Rename(_PD + "input_proj.", "pixel_decoder.input_proj."),
    Rename(_ENC + "self_attn.", "pixel_decoder.encoder.{j}.self_attn.self_attn."),
    Rename(_ENC + "norm1.", "pixel_decoder.encoder.{j}.self_attn.norm."),
    Rename(_ENC + "linear1.", "pixel_decoder.encoder.{j}.ffn.linear1."),
    Rename(_ENC + "linear2.", "pixel_decoder.encoder.{j}.ffn.linear2."),
    Rename(_ENC + "norm2.", "pixel_decoder.encoder.{j}.ffn.norm."),
    # DETR's decoder layer: self-attention -> norm1, cross-attention -> norm2, FFN -> norm3.
    Rename(_DEC + "self_attn.", "decoder.layers.{j}.self_attn.self_attn."),
    Rename(_DEC + "norm1.", "decoder.layers.{j}.self_attn.norm."),
    Rename(_DEC + "multihead_attn.", "decoder.layers.{j}.cross_attn.multihead_attn."),
    Rename(_DEC + "norm2.", "decoder.layers.{j}.cross_attn.norm."),
    Rename(_DEC + "linear1.", "decoder.layers.{j}.ffn.linear1."),
    Rename(_DEC + "linear2.", "decoder.layers.{j}.ffn.linear2."),
    Rename(_DEC + "norm3.", "decoder.layers.{j}.ffn.norm."),
    Rename(_PR + "transformer.decoder.norm.", "decoder.decoder_norm."),
    Rename(_PR + "query_embed.", "decoder.query_embed."),
    Rename(_PR + "input_proj.", "decoder.input_proj."),
    Rename(_PR + "mask_embed.", "decoder.mask_embed."),
    Rename(_PR + "class_embed.", "class_embed."),
    Rename("ml_head.", "ml_head."),
    Rename("ml_norm.", "ml_norm."),
)


def caffe2_names(names: list[str]) -> dict[str, str]:
    """Caffe2 ResNet blob names -> detectron2's, as `convert_basic_c2_names` renames the
    backbone part (its detection-head and DensePose rules are left out): `_` -> `.`, `_w` /
    `_b` -> weight / bias, `bn_s` / `bn_b` / `bn_rm` / `bn_riv` (and gn) -> norm.*, the stem's
    `conv1` / `res_conv1_bn` -> `stem.conv1`, `branch1` / `branch2{a,b,c}` -> shortcut / conv{1,2,3}."""
    subs = [
        (r"\.b$", ".bias"), (r"\.w$", ".weight"),
        (r"bn\.s$", "norm.weight"), (r"bn\.bias$", "norm.bias"), (r"bn\.rm", "norm.running_mean"),
        (r"bn\.running\.mean$", "norm.running_mean"), (r"bn\.riv$", "norm.running_var"),
        (r"bn\.running\.var$", "norm.running_var"), (r"bn\.gamma$", "norm.weight"), (r"bn\.beta$", "norm.bias"),
        (r"gn\.s$", "norm.weight"), (r"gn\.bias$", "norm.bias"),
        (r"^res\.conv1\.norm\.", "conv1.norm."), (r"^conv1\.", "stem.conv1."),
    ]
    out = {}
    for name in names:
        new = name.replace("_", ".")
        for pattern, repl in subs:
            new = re.sub(pattern, repl, new)
        for old, block in ((".branch1.", ".shortcut."), (".branch2a.", ".conv1."), (".branch2b.", ".conv2."),
                           (".branch2c.", ".conv3.")):
            new = new.replace(old, block)
        out[name] = new
    return out


# ---------------------------------------------------------------------------------------
# Backbones


def _skipped(name: str) -> bool:
    return name.endswith(_SKIPPED_SUFFIXES) or name in _SKIPPED_NAMES or name.startswith(_SKIPPED_PREFIXES)


def backbone_kind(own: Sequence[str], prefix: str = "") -> str | None:
    """The kind of a PyramidBackbone ("resnet" / "swin") from its state names under `prefix`,
    None for another backbone."""
    names = set(own)
    if f"{prefix}body.conv1.weight" in names and f"{prefix}body.layer1.0.conv1.weight" in names:
        return "resnet"
    if f"{prefix}body.patch_embed.proj.weight" in names and f"{prefix}out_norms.0.weight" in names:
        return "swin"
    return None


def _file_kind(names: Sequence[str]) -> str | None:
    """The backbone a file's (backbone-relative) names describe: "resnet", "swin" or None."""
    if any(n.startswith("stem.conv1.") or re.match(r"res[2-5]\.\d+\.", n) for n in names):
        return "resnet"
    if any(n.startswith(("patch_embed.", "layers.0.blocks.")) for n in names):
        return "swin"
    return None


def looks_detectron2(names: Sequence[str]) -> bool:
    """Whether a backbone file's names are detectron2's (ResNet `stem.conv1` / `res2.0...`, or
    D2SwinTransformer's output norms `norm0..3`) rather than timm's."""
    bare = [_backbone_relative(n) for n in names]
    return _file_kind(bare) == "resnet" or any(re.fullmatch(r"norm[0-3]\.weight", n) for n in bare)


def _backbone_relative(name: str) -> str:
    for prefix in ("backbone.bottom_up.", "backbone."):  # a detector's FPN wraps its ResNet in bottom_up
        if name.startswith(prefix):
            return name.removeprefix(prefix)
    return name


def _msra_stem(weight: Tensor, std: Sequence[float]) -> Tensor:
    """MSRA's conv1 (input BGR, 0..255 minus the mean, std 1: detectron2's defaults for these
    files) for our input (RGB, (x - mean) / std on the same scale): channels reversed, each
    scaled by its std, so that the stem computes exactly what it computed on its own input."""
    rgb = weight.flip(1)
    return rgb * torch.tensor(std, dtype=rgb.dtype).view(1, -1, 1, 1)


def _fill_frozen_stats(state: dict[str, Tensor], body: nn.Module) -> None:
    """Caffe2 BN layers are an affine (scale, bias) with the statistics folded in: give each
    one mean 0 and variance 1 - eps, detectron2's FrozenBatchNorm2d initial values, so that
    normalising by sqrt(var + eps) leaves the affine exactly as stored."""
    for name in list(state):
        if name.startswith("body.") and name.endswith(".weight") and state[name].ndim == 1:
            module_name = name.removeprefix("body.").removesuffix(".weight")
            module = body.get_submodule(module_name)
            if hasattr(module, "running_var") and f"body.{module_name}.running_var" not in state:
                eps = float(getattr(module, "eps", 1e-5))
                state[f"body.{module_name}.running_mean"] = torch.zeros_like(state[name])
                state[f"body.{module_name}.running_var"] = torch.full_like(state[name], 1.0 - eps)


def detectron2_backbone_state(backbone: nn.Module, ckpt: Detectron2File, option: str = "backbone_weights"
                              ) -> tuple[dict[str, Tensor], list[str]]:
    """A detectron2 backbone checkpoint as a state dict of `backbone` (a PyramidBackbone: names
    `body.*` / `out_norms.*`) and the file's names no tensor of it takes.

    Accepts the backbone alone (ImageNet files) or a whole model (only `backbone.*` is read).
    Swin: relative-position tables / patch embedding of another window / patch size are
    resampled as timm does for its own checkpoints. MSRA (Caffe2) ResNets: BN statistics and
    the stem's input convention are converted (`_fill_frozen_stats`, `_msra_stem`); their
    stride sits in the 1x1 convs (STRIDE_IN_1X1), timm's in the 3x3: warned, not converted.
    """
    own = backbone.state_dict()
    kind = backbone_kind(list(own))
    if kind is None:
        raise UserError(f"{option}: {ckpt.path} is a detectron2 checkpoint; detectron2 layouts load into the "
                        "ResNet-50 and Swin backbones (mask2former-r50 / -swin*, maskformer-*)")
    names = {n: n for n in ckpt.tensors}
    if ckpt.caffe2:
        names = caffe2_names(list(ckpt.tensors))
    whole = any(n.startswith("sem_seg_head.") for n in ckpt.tensors)
    relative = {orig: _backbone_relative(n) for orig, n in names.items()
                if not whole or n.startswith("backbone.")}
    found = _file_kind(list(relative.values()))
    if found is not None and found != kind:
        raise UserError(f"{option}: {ckpt.path} holds a detectron2 {found} backbone; this model's is a {kind}: pick "
                        f"a matching model.model")
    rules = RESNET_RULES if kind == "resnet" else SWIN_RULES
    state: dict[str, Tensor] = {}
    origin: dict[str, str] = {}  # our name -> the file's, to report the file's names
    unexpected = []
    for orig, rel in relative.items():
        if _skipped(rel) or rel.startswith(_CLASSIFIER_PREFIXES):
            continue
        ours = rename(rel, rules)
        if ours is None or ours in state:
            unexpected.append(orig)
        else:
            state[ours], origin[ours] = ckpt.tensors[orig], orig
    body = backbone.get_submodule("body")
    if kind == "swin":
        from timm.models.swin_transformer import checkpoint_filter_fn

        inner = checkpoint_filter_fn({k.removeprefix("body."): v for k, v in state.items() if k.startswith("body.")},
                                     body)
        state = {**{k: v for k, v in state.items() if not k.startswith("body.")},
                 **{f"body.{k}": v for k, v in inner.items()}}
    elif ckpt.caffe2:
        _fill_frozen_stats(state, body)
        if "body.conv1.weight" in state:
            std = [float(s) * 255.0 for s in timm.data.resolve_model_data_config(body)["std"]]
            state["body.conv1.weight"] = _msra_stem(state["body.conv1.weight"], std)
        warnings.warn(f"{ckpt.path.name}: an MSRA (Caffe2) ResNet strides in its 1x1 convs (detectron2 "
                      "STRIDE_IN_1X1), timm's resnet50 in its 3x3 convs: the weights load, the stride-2 blocks "
                      "compute differently (fine-tuning adapts them)", stacklevel=2)
    unexpected += [origin.get(k, k) for k in state if k not in own]
    return {k: v for k, v in state.items() if k in own}, unexpected


def _check_shapes(state: dict[str, Tensor], own: dict[str, Tensor], official: Callable[[str], str], path: Path,
                  option: str, fix: Callable[[str], str]) -> None:
    for name, value in state.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise UserError(f"{option}: {path} does not fit this model: {official(name)} is {list(value.shape)}, "
                            f"its {name} {list(own[name].shape)}; {fix(name)}")


def _load(module: nn.Module, state: dict[str, Tensor], path: Path, option: str) -> list[str]:
    """Copy `state` into `module` (strict=False); UserError when it holds nothing. Missing names."""
    own = module.state_dict()
    if not state:
        raise UserError(f"{option}: no tensor of {path} fits this model (its names look like "
                        f"'{next(iter(own), '')}')")
    result = module.load_state_dict(state, strict=False)
    return [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]


def load_detectron2_backbone(backbone: nn.Module, path: str | Path, tensors: dict[str, Tensor] | None = None
                             ) -> tuple[list[str], list[str]]:
    """Load a detectron2 backbone checkpoint into a PyramidBackbone (ResNet-50 or Swin).

    `tensors`: the file's tensors when the caller has read them already (a torch file), else
    the file is read (`read_detectron2`). Returns (missing: the backbone's names it did not
    get, e.g. `body.layer1.0.bn1.weight`, `out_norms.0.weight`; unexpected: the file's names
    that fit nothing). UserError for a shape mismatch or a file of which nothing fits; a
    warning lists missing names.
    """
    option = "backbone_weights"
    ckpt = (read_detectron2(path, option) if tensors is None
            else Detectron2File(Path(path), {k.removeprefix("module."): v for k, v in tensors.items()}, ""))
    state, unexpected = detectron2_backbone_state(backbone, ckpt, option)
    rules = RESNET_RULES if backbone_kind(list(backbone.state_dict())) == "resnet" else SWIN_RULES
    _check_shapes(state, backbone.state_dict(), lambda n: rename(n, rules, to_ours=False) or n, ckpt.path, option,
                  lambda n: "pick the matching model.model size")
    missing = _load(backbone, state, ckpt.path, option)
    if missing:
        warnings.warn(f"backbone weights {ckpt.path.name}: {len(missing)} missing keys, e.g. {missing[:3]}",
                      stacklevel=2)
    return missing, unexpected


# ---------------------------------------------------------------------------------------
# Whole models


def model_rules(model: nn.Module, option: str = "weights") -> list[Rename]:
    """The name table of a Mask2FormerModel (or its MaskFormer / video configurations): the
    backbone's under `backbone.`, then the heads'. UserError for a model no official layout fits."""
    own = list(model.state_dict())
    kind = backbone_kind(own, "backbone.")
    if kind is None:
        raise UserError(f"{option}: detectron2 checkpoints load into Mask2Former / MaskFormer models on a ResNet-50 "
                        "or Swin backbone (model.model=mask2former-r50, -swin*, maskformer-*)")
    backbone = [r.under("backbone.", "backbone.") for r in (RESNET_RULES if kind == "resnet" else SWIN_RULES)]
    if "pixel_decoder.level_embed" in own:
        return backbone + list(MASK2FORMER_HEAD_RULES)
    if "pixel_decoder.top.0.weight" in own:
        return backbone + list(MASKFORMER_HEAD_RULES)
    raise UserError(f"{option}: this model's heads have no detectron2 layout (a Mask2Former or MaskFormer is needed)")


def detectron2_names(model: nn.Module) -> dict[str, str]:
    """Our state-dict name -> the official detectron2 name, for every tensor of `model`.
    ValueError for a name no rule covers (a layout this module does not know)."""
    rules = model_rules(model)
    out = {}
    for name in model.state_dict():
        official = rename(name, rules, to_ours=False)
        if official is None:
            raise ValueError(f"no detectron2 name for {name}")
        out[name] = official
    return out


def _official_alias(name: str) -> str:
    """A name of an older official layout as the current one: MaskFormerHead v1 kept the
    pixel decoder's tensors directly under sem_seg_head (its _load_from_state_dict moves them
    under pixel_decoder), the masked decoder v1 called query_feat `static_query`."""
    if name.startswith("sem_seg_head.") and not name.startswith((_PR, _PD)):
        name = _PD + name.removeprefix("sem_seg_head.")
    return name.replace(_PR + "static_query.", _PR + "query_feat.")


def _layout_errors(names: list[str], rules: list[Rename], path: Path, option: str) -> None:
    """One-line errors for a file of another official architecture than the model's."""
    masked = any(r.official.startswith(_PR + "transformer_cross") for r in rules)
    if masked and any(n.startswith(_PR + "transformer.decoder.") for n in names):
        raise UserError(f"{option}: {path} is a MaskFormer checkpoint (DETR decoder); load it into a maskformer-* "
                        "model")
    if not masked and any(n.startswith(_PR + "transformer_cross_attention_layers.") for n in names):
        raise UserError(f"{option}: {path} is a Mask2Former checkpoint (masked-attention decoder); load it into a "
                        "mask2former-* model")
    if any(n.startswith(_PR + "transformer.encoder.") for n in names):
        raise UserError(f"{option}: {path} has a transformer encoder in its predictor (MASK_FORMER.ENC_LAYERS > 0), "
                        "which rankseg's MaskFormer does not build (every official config uses 0)")
    if not any(n.startswith("sem_seg_head.") for n in names):
        raise UserError(f"{option}: {path} holds no sem_seg_head.* tensors, so it is not a whole Mask2Former / "
                        "MaskFormer model; a backbone checkpoint goes to --backbone-weights")


def detectron2_model_state(model: nn.Module, ckpt: Detectron2File, option: str = "weights"
                           ) -> tuple[dict[str, Tensor], list[str]]:
    """An official Mask2Former / MaskFormer checkpoint (+ the RankSeg fork's ml head) as a
    state dict of `model` (only names the model has) and the file's names that fit nothing.

    The backbone part goes through `detectron2_backbone_state` (ResNet / Swin names), the
    rest through the head table. Shapes are not checked here (`load_detectron2_mask2former`
    refuses a mismatch, warm starting skips it).
    """
    rules = model_rules(model, option)
    aliases = {n: _official_alias(n) for n in ckpt.tensors}
    _layout_errors(list(aliases.values()), rules, ckpt.path, option)
    own = model.state_dict()
    backbone = model.get_submodule("backbone")
    bb_state, bb_unexpected = detectron2_backbone_state(backbone, ckpt, option)
    state = {f"backbone.{k}": v for k, v in bb_state.items()}
    unexpected = list(bb_unexpected)
    for orig, name in aliases.items():
        if name.startswith("backbone.") or _skipped(name):
            continue
        ours = rename(name, rules)
        if ours is None or ours not in own or ours in state:
            unexpected.append(orig)
        else:
            state[ours] = ckpt.tensors[orig]
    return state, unexpected


def _shape_fix(name: str) -> str:
    """What a shape mismatch at our tensor `name` means, in terms of rankseg options."""
    if name.startswith(("class_embed.", "ml_head.cls_emb", "ml_head.fc.")):
        return "the checkpoint has another number of classes: set model.num_classes to its K"
    if name.startswith(("decoder.query_feat.", "decoder.query_embed.")):
        return "the checkpoint has another query count: set model.mask2former.num_queries to it"
    if name.startswith("ml_norm."):
        return "the checkpoint has another kappa (ml_norm is kappa + 1 wide): set model.kappa to it"
    return "the checkpoint is of another model size: pick the matching model.model / widths"


def load_detectron2_mask2former(model: nn.Module, path: str | Path, option: str = "weights"
                                ) -> tuple[list[str], list[str]]:
    """Load a whole official checkpoint (facebookresearch/Mask2Former or MaskFormer
    `model_final_*.pkl`, a detectron2 run's `.pth`, the RankSeg fork's) into `model`, in place.

    Returns (missing: the model's names the file did not set; unexpected: the file's names that
    fit nothing). UserError for a file of another architecture and, naming the first tensor,
    for a shape mismatch (another K, query count, kappa, width).
    """
    ckpt = read_detectron2(path, option)
    state, unexpected = detectron2_model_state(model, ckpt, option)
    rules = model_rules(model, option)
    _check_shapes(state, model.state_dict(), lambda n: rename(n, rules, to_ours=False) or n, ckpt.path, option,
                  _shape_fix)
    return _load(model, state, ckpt.path, option), unexpected


def detectron2_warm_start(model: nn.Module, path: Path) -> tuple[dict[str, Tensor], list[str]] | None:
    """`rankseg train --init-from` for a detectron2 `.pkl`: (the file's tensors under the
    model's names, the file's names that fit nothing); None for any other source (a run
    directory, .safetensors, .pt, ...), which the engine reads itself."""
    if path.suffix != ".pkl":
        return None
    return detectron2_model_state(model, read_detectron2(path, "--init-from"), "--init-from")
