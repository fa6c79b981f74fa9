"""Multi-label classifier of the independent scheme (docs/method.md sec. 6, paper §3.2), and the
frozen form in which a segmenter uses a trained one as its selector.

Query2Label-style: ViT backbone -> class queries decode the patch map (the "2x TranDec"
head: 16x16 pooled map, 1x1 conv, sine positions, 2 post-norm cross-attention layers without
self-attention, LayerNorm, GroupWiseLinear) -> K logits. Parameter names line up with the
Segmenter by design: the backbone is `backbone.vit.*` in both families, so a classifier run
initialises a segmenter's backbone (`--init-from`); the head (`head.query_embed`,
`head.decoder.*`) matches nothing of a segmenter. docs/model.md lists every difference from
the official Query2Label.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from rankseg_core.config.model import ModelConfig, SelectorConfig
from rankseg_core.errors import UserError
from rankseg_core.model.backbone import ViTBackbone, load_backbone_weights
from rankseg_core.model.heads import TranDecMLHead, _init_weights
from rankseg_core.model.selection import NO_SELECTION, Selection
from rankseg_core.utils.integrity import content_digest


class QueryHead(nn.Module):
    """Class queries (1 x K x D, the query positions of a zero target) decoding the patch map."""

    def __init__(self, num_classes: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.query_embed = nn.Parameter(torch.zeros(1, num_classes, dim))
        self.decoder = TranDecMLHead(dim, num_classes, dropout)
        self.decoder.apply(_init_weights)  # the Segmenter head's init (GroupWiseLinear keeps its own)
        trunc_normal_(self.query_embed, std=0.02)

    def forward(self, feats: Tensor, clip_len: int) -> Tensor:
        """feats (B*T) x D x h x w -> logits B x K (a clip's frames form one memory)."""
        return self.decoder(feats, self.query_embed, clip_len)


class MultiLabelClassifier(nn.Module):
    """images (B*T) x 3 x H x W (sides multiples of 16) -> multi-label logits B x K."""

    def __init__(self, cfg: ModelConfig, arch: str) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = ViTBackbone(cfg, arch)
        self.head = QueryHead(cfg.num_classes, self.backbone.embed_dim, cfg.dropout)

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def forward(self, images: Tensor, selection: Selection = NO_SELECTION) -> Tensor:
        """`selection` is accepted as by every model of the engine and unused: a classifier
        ranks all K classes and selects none."""
        return self.head(self.backbone(images), self.cfg.clip_len)

    def data_config(self) -> dict:
        """mean/std on the 0..255 scale (the backbone's timm data config)."""
        return self.backbone.data_config()


def build_classifier(cfg: ModelConfig, arch: str) -> MultiLabelClassifier:
    """Validate `cfg`, build the classifier on the timm ViT `arch` and load local backbone
    weights if given."""
    cfg.validate()
    model = MultiLabelClassifier(cfg, arch)
    if cfg.backbone_weights:
        load_backbone_weights(model.backbone, cfg.backbone_weights)
    return model


# ---------------------------------------------------------------------------------------
# The frozen selector of a segmenter


SELECTOR_ATTR = "selector"  # the attribute under which a segmenter holds its FrozenSelector


class FrozenSelector(nn.Module):
    """A trained classifier that never trains: no gradients, always in eval mode (dropout
    off whatever `model.train()` says), and outside its owner's state dict, because its
    weights belong to the classifier run that config.yaml names (with their digest)."""

    def __init__(self, classifier: MultiLabelClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.register_state_dict_post_hook(_drop_own_keys)
        self.register_load_state_dict_post_hook(_forget_own_keys)

    def train(self, mode: bool = True) -> FrozenSelector:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """The same input the segmenter sees -> logits B x K (float32, no graph)."""
        return self.classifier(images).float()


def _drop_own_keys(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]


def _forget_own_keys(module: nn.Module, incompatible: object) -> None:
    # The owner's weights never hold the selector's: its keys are not "missing" from them.
    prefix = f"{SELECTOR_ATTR}."
    # `incompatible` is torch's private _IncompatibleKeys (a namedtuple): no public type to name.
    missing = incompatible.missing_keys  # type: ignore[attr-defined]
    missing[:] = [k for k in missing if not k.startswith(prefix) and f".{prefix}" not in k]


def _read_state(path: Path) -> dict[str, Tensor]:
    """Tensors of a run's weights file (model.safetensors or a checkpoint's "model")."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(str(path), map_location="cpu", weights_only=True)["model"]
        if not isinstance(state, dict):
            raise TypeError("no model dictionary")
        return state
    except Exception as exc:  # noqa: BLE001 - torch / safetensors raise several types for damaged files
        raise UserError(f"model.selector.weights: cannot read {path} ({exc.__class__.__name__}); restore the "
                        "selector run's weights or retrain this segmenter with another --selector") from None


def load_selector(sel: SelectorConfig, num_classes: int, clip_len: int, arch: str) -> FrozenSelector:
    """The classifier recorded in `sel` (resolved by `rankseg_core.engine.selector.resolve_selector`),
    its weights checked against the recorded digest: a selector that changed since the
    segmenter was trained is refused, never silently used."""
    if not (sel.weights and sel.sha256 and sel.model and sel.img_size):
        raise UserError(f"model.selector.run={sel.run}: the selector is not resolved (weights, sha256, model, "
                        "img_size); start training through `rankseg train` / `rankseg_core.engine.train.train`, which "
                        "records them")
    path = Path(sel.weights)
    if not path.is_file():
        raise UserError(f"model.selector.weights: {path} not found: this segmenter selects its classes with the "
                        f"classifier run {sel.run}; restore that run (or retrain with another --selector)")
    state = _read_state(path)
    if content_digest(state) != sel.sha256:
        raise UserError(f"model.selector.weights: {path} changed since this segmenter was trained with it (its "
                        "SHA-256 differs from config.yaml's model.selector.sha256); restore the classifier's "
                        "weights or train a new segmenter with --selector")
    cfg = ModelConfig(model=sel.model, num_classes=num_classes, img_size=sel.img_size, in_chans=sel.in_chans or 3,
                      clip_len=clip_len, dropout=0.0, drop_path=0.0)
    cfg.validate()
    classifier = MultiLabelClassifier(cfg, arch)
    # load_state_dict raises a RuntimeError (a traceback) for a tensor of another shape, even
    # with strict=False: e.g. the classifier's config.yaml edited after training.
    own = classifier.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        raise UserError(f"model.selector.weights: {path} does not fit {sel.model} with K={num_classes} and "
                        f"img_size={sel.img_size} ({len(wrong)} tensors of another shape, e.g. {wrong[0]}: "
                        f"{tuple(state[wrong[0]].shape)} in the weights, {tuple(own[wrong[0]].shape)} here); "
                        "was the classifier's config.yaml edited?")
    missing, unexpected = classifier.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"model.selector.weights: {path} does not fit {sel.model} with K={num_classes} "
                        f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. "
                        f"{(list(missing) + list(unexpected))[0]}); was the classifier's config.yaml edited?")
    return FrozenSelector(classifier)
