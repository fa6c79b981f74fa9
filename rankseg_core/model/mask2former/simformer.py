"""What SimFormer adds to a MaskFormer / Mask2Former model: the pixel-pair similarity net.

SimFormer (Chen et al., NeurIPS 2022; bcmi/SimFormer-Weak-Shot-Semantic-Segmentation) learns
on base classes whether two pixels belong to the same class, from their pixel-decoder
features, and distils that class-agnostic similarity into the novel classes' score maps
(losses/simformer.py). The net lives in the model so that the optimizer trains it and
checkpoints keep it; the losses that feed it pairs live in losses/.

- `PairSimilarityNet` (the official CroPixelResSimConvNet): a pair's two D-dim pixel features,
  concatenated (2D), go through `layers` residual blocks of two linear + BatchNorm + ReLU
  layers (width D; the first block's shortcut is a linear + ReLU from 2D), then a linear to
  two logits; the output is softmax(...)[1], the probability that the pair is "same class".
  The official net applies 1x1 convolutions to a B x 2D x J x J grid of pairs, which is the
  same per-pair map (and BatchNorm2d over B, J, J is BatchNorm1d over the B*J*J pairs).
- `PairBalance` (the official BalanceBinaryWeightManager): counts of dissimilar / similar
  pairs of the last 25 steps (starting from one of each), which give the class-balanced BCE
  weights. Buffers, so that a resumed run continues with the same counts.
- `SimFormerModel`: the family's model + the net; its output also carries the pixel
  decoder's mask features (the features the official code samples pixel pairs from).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rankseg_core.config.model import ModelConfig
from rankseg_core.model.mask2former.backbone import load_pyramid_weights
from rankseg_core.model.mask2former.model import Mask2FormerModel, Mask2FormerOutput
from rankseg_core.model.selection import NO_SELECTION, Selection

BALANCE_WINDOW = 25  # maxlen of the official count queues
BALANCE_STRIDE = 5  # the official counts read every 5th pair in both point dimensions (GT[:, ::5, ::5])


class PairBlock(nn.Module):
    """The official BasicBlock on one pair per row: relu(bn(W2 relu(bn(W1 x)))) + shortcut,
    shortcut = relu(W x) when the widths differ, else x. x: N x d_in -> N x d_out."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out)
        self.fc2, self.bn2 = nn.Linear(d_out, d_out), nn.BatchNorm1d(d_out)
        self.shortcut = nn.Linear(d_in, d_out) if d_in != d_out else None

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.shortcut is None else self.shortcut(x).relu()
        y = self.bn1(self.fc1(x)).relu()
        return self.bn2(self.fc2(y)).relu() + residual


class PairSimilarityNet(nn.Module):
    """Pair features ... x 2D -> ... probabilities that the two pixels share a class."""

    def __init__(self, dim: int, layers: int = 3) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[PairBlock(2 * dim if i == 0 else dim, dim) for i in range(layers)])
        self.out = nn.Linear(dim, 2)

    def forward(self, pairs: Tensor) -> Tensor:
        flat = pairs.reshape(-1, pairs.shape[-1])
        prob = self.out(self.blocks(flat)).softmax(-1)[:, 1]
        return prob.reshape(pairs.shape[:-1])


class PairBalance(nn.Module):
    """Class-balance weights of the pair BCE from the pair counts of the last 25 steps.

    counts: 25 x 2 (dissimilar, similar) rows, a ring; the official queues start with one
    (1, 1) entry, which the 25th update pushes out. weights() = (w_dissimilar, w_similar) =
    (n_sim / n, n_dis / n) over the window: the rarer kind of pair weighs more.
    """

    counts: Tensor
    written: Tensor

    def __init__(self) -> None:
        super().__init__()
        counts = torch.zeros(BALANCE_WINDOW, 2)  # float32 holds these integer counts exactly
        counts[0] = 1.0
        self.register_buffer("counts", counts)
        self.register_buffer("written", torch.ones((), dtype=torch.long))

    @torch.no_grad()
    def update(self, same: Tensor) -> None:
        """same: B x J x J bool pair labels of one step (the official counts read every 5th
        pair along both point dimensions, padded pairs included). On the device: the ring's
        row is a device index, so nothing waits for the counts."""
        sub = same[:, ::BALANCE_STRIDE, ::BALANCE_STRIDE]
        pos = sub.sum().to(self.counts.dtype)
        row = torch.remainder(self.written, BALANCE_WINDOW).view(1)
        self.counts.index_copy_(0, row, torch.stack([sub.numel() - pos, pos]).view(1, 2))
        self.written += 1

    def weights(self) -> tuple[Tensor, Tensor]:
        """(w_dissimilar, w_similar), 0-dim tensors on the counts' device."""
        neg, pos = self.counts.sum(0).unbind()
        return pos / (pos + neg), neg / (pos + neg)


@dataclass
class SimFormerOutput(Mask2FormerOutput):
    """Mask2FormerOutput + what the pixel-pixel losses read.

    pixel_features: B x D x h x w mask features of the pixel decoder (the grid of pred_masks).
    pair_net / pair_balance: the model's pair similarity net and its balance counts.
    """

    pixel_features: Tensor | None = None
    pair_net: PairSimilarityNet | None = None
    pair_balance: PairBalance | None = None


class SimFormerModel(Mask2FormerModel):
    """A MaskFormer / Mask2Former (timm pyramid backbone) with SimFormer's pair net.

    The pixel decoder's mask features are read with a forward hook: the parent's forward is
    reused unchanged, and parameter names stay the parent's (+ `pair_net.*`, `pair_balance.*`).
    """

    def __init__(self, cfg: ModelConfig, arch: str, num_queries: int, decoder: str = "masked") -> None:
        super().__init__(cfg, arch, num_queries, decoder)
        m = cfg.mask2former
        self.pair_net = PairSimilarityNet(m.mask_dim, m.simformer.sim_layers)
        self.pair_balance = PairBalance()
        self._mask_features: Tensor | None = None
        self.pixel_decoder.register_forward_hook(self._keep_mask_features)

    def _keep_mask_features(self, module: nn.Module, inputs: object, output: tuple[Tensor, list[Tensor]]) -> None:
        self._mask_features = output[0]

    def forward(self, images: Tensor, selection: Selection = NO_SELECTION) -> SimFormerOutput:
        out = super().forward(images, selection)
        feats, self._mask_features = self._mask_features, None  # hold no activations between calls
        fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(Mask2FormerOutput)}
        return SimFormerOutput(**fields, pixel_features=feats, pair_net=self.pair_net, pair_balance=self.pair_balance)


def build_simformer(cfg: ModelConfig, arch: str, num_queries: int, decoder: str = "masked") -> SimFormerModel:
    """Validate `cfg` and build a SimFormerModel on the timm backbone `arch`, loading local
    backbone weights if given (as `build_mask2former` does for the same backbones)."""
    cfg.validate()
    model = SimFormerModel(cfg, arch, num_queries, decoder)
    if cfg.backbone_weights:
        load_pyramid_weights(model.backbone, cfg.backbone_weights)
    return model
