"""ViT-Adapter on a timm BEiT: a Mask2Former backbone B x 3 x H x W -> 4 maps at strides 4 - 32.

What czczup/ViT-Adapter's `BEiTAdapter` computes (segmentation/mmseg_custom/models/backbones/
beit_adapter.py and adapter_modules.py; the ADE20K Mask2Former configs use it with BEiT-L):

- a plain BEiT (timm's `Beit`, built with pretrained=False: per-block relative position bias
  with the three cls entries, q / v biases, layer scale, no absolute position embedding) runs
  on the 16 x 16 patches and the cls token in 4 groups of blocks (`interaction_indexes`,
  [[0, 5], [6, 11], [12, 17], [18, 23]] for BEiT-L); its final norm and classifier are unused;
- the spatial prior module (SPM), a small conv stem, gives c1..c4 at strides 4, 8, 16, 32, all
  projected to the ViT width D; c2, c3, c4 (plus a learned level embedding each) are flattened
  into one token sequence c;
- before each group the injector lets the ViT tokens read c by multi-scale deformable
  cross-attention (3 levels, each token's reference point at its patch centre), scaled by a
  per-channel gamma that starts at 1e-6 so that training starts from the pretrained ViT;
- after each group the extractor lets c read the ViT tokens (1 level) the same way, then a
  ConvFFN (Linear, one 3x3 depth-wise conv applied to each level's map, GELU, Linear); the last
  group runs two extra extractors;
- c2, c3, c4 become maps again, c1 += a 2x transposed-conv up-sampling of c2, each level adds
  its group's ViT tokens bilinearly resized to its stride (group i -> level i), and a
  BatchNorm per level (SyncBN in the official code) gives the output.

The deformable attention is deform_attn.py's, with ViT-Adapter's `deform_ratio` (values
projected to ratio x D channels). Input sizes: any multiple of 32. The relative position
tables are built for the `img_size` / 16 grid; at that grid (every training crop) the blocks run
as timm defines them. At another grid (whole-image evaluation of a larger image) each table is
resized bicubically to it for that forward (timm's `resize_rel_pos_bias_table_simple`): the
official code only ever runs the built grid, because it evaluates sliding windows of the crop.

`load_vit_adapter_weights` reads the official checkpoint layout (`backbone.blocks.*`,
`backbone.spm.*`, `backbone.interactions.*`, `backbone.level_embed`, `backbone.up`,
`backbone.norm1..4`), a BEiT pretraining checkpoint (unilm / timm / mmseg names) or this
module's own state dict.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.layers.pos_embed_rel import gen_relative_position_index, resize_rel_pos_bias_table_simple
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rankseg_core.errors import UserError
from rankseg_core.model.backbone import read_weights
from rankseg_core.model.convseg.vit_pyramid import BEIT_L, split_beit_state
from rankseg_core.model.mask2former.deform_attn import MSDeformAttn, level_sizes, ms_deform_sample
from rankseg_core.model.mask2former.pixel_decoder import reference_points

PATCH = 16
STRIDES = (4, 8, 16, 32)
N_LEVELS = 3  # c2, c3, c4: the SPM levels the ViT tokens read
LN_EPS = 1e-6  # the official norm_layer: partial(nn.LayerNorm, eps=1e-6)
# Top-level names of the adapter's parameters in the official layout (the BEiT's are blocks.* etc.).
ADAPTER_KEYS = ("spm.", "interactions.", "level_embed", "up.", "norm1.", "norm2.", "norm3.", "norm4.")


class AdapterDeformAttn(MSDeformAttn):
    """Multi-scale deformable attention with ViT-Adapter's `deform_ratio`: the values are
    projected to ratio x dim channels (split over the heads), the output back to dim."""

    def __init__(self, dim: int, n_levels: int, n_heads: int, n_points: int, ratio: float) -> None:
        super().__init__(dim, n_levels, n_heads, n_points)
        value_dim = int(dim * ratio)
        if value_dim < n_heads or value_dim % n_heads:
            raise ValueError(f"deform_ratio {ratio} gives {value_dim} value channels, not a multiple of {n_heads} heads")
        self.value_dim = value_dim
        self.value_proj = nn.Linear(dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    def forward(self, query: Tensor, reference: Tensor, value_in: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """query B x Lq x D; reference B' x Lq x L' x 2 ((x, y) in [0, 1]; B' = 1 and L' = 1
        broadcast); value_in B x S x D (S = sum of the levels' h * w, row-major) -> B x Lq x D."""
        b, lq, _ = query.shape
        m, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_in).reshape(b, value_in.shape[1], m, self.value_dim // m)
        offsets = self.sampling_offsets(query).reshape(b, lq, m, n_levels, n_points, 2)
        weights = self.attention_weights(query).reshape(b, lq, m, n_levels * n_points).softmax(-1)
        weights = weights.reshape(b, lq, m, n_levels, n_points)
        # Offsets are in pixels of each level: divide by (w, h) to get [0, 1] coordinates.
        norm = level_sizes(tuple(shapes), query.dtype, query.device)
        locations = reference[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
        locations = locations.expand(b, -1, -1, -1, -1, -1)
        return self.output_proj(ms_deform_sample(value, shapes, locations, weights))


@dataclass
class AdapterGrid:
    """Where the adapter's tokens lie for one input size (H, W multiples of 32).

    vit: (H/16, W/16), the ViT tokens' grid; levels: [(H/8, W/8), (H/16, W/16), (H/32, W/32)],
    the grids of c2, c3, c4 (concatenated in this order); inject_ref: 1 x (H/16 * W/16) x 1 x 2
    patch centres (the injector's queries); extract_ref: 1 x S x 1 x 2, the centres of every c
    token on its own level's grid (the extractor's queries).
    """

    vit: tuple[int, int]
    levels: list[tuple[int, int]]
    inject_ref: Tensor
    extract_ref: Tensor

    @staticmethod
    def of(height: int, width: int, device: torch.device) -> AdapterGrid:
        if height % 32 or width % 32:
            raise ValueError(f"ViT-Adapter input {height}x{width} is not a multiple of 32; pad it (Mask2FormerModel does)")
        levels = [(height // s, width // s) for s in STRIDES[1:]]
        vit = levels[1]
        return AdapterGrid(vit, levels, reference_points([vit], device)[None, :, None, :],
                           reference_points(levels, device)[None, :, None, :])


class DWConv(nn.Module):
    """One 3x3 depth-wise conv applied to each level's tokens as a map: B x S x C -> B x S x C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        b, _, c = x.shape
        parts = x.split([h * w for h, w in shapes], dim=1)
        maps = [self.dwconv(p.transpose(1, 2).reshape(b, c, h, w)) for p, (h, w) in zip(parts, shapes)]
        return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


class ConvFFN(nn.Module):
    """Linear -> depth-wise 3x3 conv per level -> GELU -> Linear, on B x S x D tokens."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), shapes)))
        return self.drop(self.fc2(x))


class Injector(nn.Module):
    """ViT tokens B x N x D read the SPM tokens c (3 levels): x + gamma * attn(norm(x), norm(c))."""

    def __init__(self, dim: int, heads: int, points: int, ratio: float, init_values: float) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.feat_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = AdapterDeformAttn(dim, N_LEVELS, heads, points, ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, query: Tensor, grid: AdapterGrid, feat: Tensor) -> Tensor:
        attn = self.attn(self.query_norm(query), grid.inject_ref, self.feat_norm(feat), grid.levels)
        return query + self.gamma * attn


class Extractor(nn.Module):
    """SPM tokens c B x S x D read the ViT tokens (1 level), then a ConvFFN; both residual."""

    def __init__(self, dim: int, heads: int, points: int, ratio: float, cffn_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.feat_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = AdapterDeformAttn(dim, 1, heads, points, ratio)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, query: Tensor, grid: AdapterGrid, feat: Tensor) -> Tensor:
        query = query + self.attn(self.query_norm(query), grid.extract_ref, self.feat_norm(feat), [grid.vit])
        return query + self.drop_path(self.ffn(self.ffn_norm(query), grid.levels))


class InteractionBlock(nn.Module):
    """Injector, one group of ViT blocks (with the cls token), extractor (+ 2 extra at the end)."""

    def __init__(self, dim: int, heads: int, points: int, ratio: float, cffn_ratio: float, init_values: float,
                 drop_path: float, extra_extractors: bool, with_cp: bool = False) -> None:
        super().__init__()
        self.with_cp: bool = with_cp
        self.injector = Injector(dim, heads, points, ratio, init_values)
        self.extractor = Extractor(dim, heads, points, ratio, cffn_ratio, drop_path)
        self.extra_extractors = (nn.Sequential(*(Extractor(dim, heads, points, ratio, cffn_ratio, drop_path)
                                                 for _ in range(2))) if extra_extractors else None)

    def forward(self, x: Tensor, c: Tensor, cls: Tensor, blocks: Callable[[Tensor], Tensor], grid: AdapterGrid
                ) -> tuple[Tensor, Tensor, Tensor]:
        """x B x N x D ViT tokens, c B x S x D SPM tokens, cls B x 1 x D; `blocks` maps
        B x (1 + N) x D -> B x (1 + N) x D. Returns the new (x, c, cls)."""
        x = maybe_checkpoint(self.with_cp, self.injector, x, grid, c)
        out = blocks(torch.cat([cls, x], dim=1))
        cls, x = out[:, :1], out[:, 1:]
        c = maybe_checkpoint(self.with_cp, self.extractor, c, grid, x)
        if self.extra_extractors is not None:
            for extractor in self.extra_extractors:
                c = maybe_checkpoint(self.with_cp, extractor, c, grid, x)
        return x, c, cls


def maybe_checkpoint(enabled: bool, fn: Callable[..., Tensor], *args: Any) -> Tensor:
    """fn(*args), recomputed in the backward pass instead of storing its activations when
    `enabled` and gradients are on (the official with_cp; the RNG state is replayed, so drop
    path draws the same paths and the result is the same)."""
    if enabled and torch.is_grad_enabled():
        return cast(Tensor, checkpoint(fn, *args, use_reentrant=False))
    return fn(*args)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """A ResNet-like stem: B x C x H x W -> c1 B x D x H/4 x W/4 (a map) and c2, c3, c4 as
    tokens B x (H/s * W/s) x D, s = 8, 16, 32 (row-major)."""

    def __init__(self, inplanes: int, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        # Sequential indices are the official checkpoint's names (stem.0 conv, stem.1 BN, ...).
        self.stem = nn.Sequential(*_conv_bn_relu(in_chans, inplanes, 2), *_conv_bn_relu(inplanes, inplanes, 1),
                                  *_conv_bn_relu(inplanes, inplanes, 1), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, dim, kernel_size=1)
        self.fc2 = nn.Conv2d(2 * inplanes, dim, kernel_size=1)
        self.fc3 = nn.Conv2d(4 * inplanes, dim, kernel_size=1)
        self.fc4 = nn.Conv2d(4 * inplanes, dim, kernel_size=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        f1 = self.stem(x)
        f2 = self.conv2(f1)
        f3 = self.conv3(f2)
        f4 = self.conv4(f3)
        tokens = [fc(f).flatten(2).transpose(1, 2) for fc, f in ((self.fc2, f2), (self.fc3, f3), (self.fc4, f4))]
        return self.fc1(f1), tokens[0], tokens[1], tokens[2]


def even_groups(depth: int) -> list[list[int]]:
    """[[first, last] block of each of 4 equal groups]: BEiT-L's [[0, 5], ..., [18, 23]]."""
    if depth % 4:
        raise ValueError(f"a {depth}-block ViT does not split into 4 equal groups; give interaction_indexes")
    q = depth // 4
    return [[i * q, (i + 1) * q - 1] for i in range(4)]


def _init_adapter(module: nn.Module) -> None:
    """The official `_init_weights` of the adapter's modules (truncated-normal linears, unit
    norms, He-normal convs over fan-out); the deformable attentions are reset afterwards."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ViTAdapter(nn.Module):
    """B x 3 x H x W (H, W multiples of 32) -> [f1, f2, f3, f4], B x D x H/s x W/s, s = 4 .. 32.

    Defaults are the official ADE20K Mask2Former config (mask2former_beit_adapter_large_896_*):
    BEiT-L (`timm_name`) at img_size 896, drop path 0.3, layer scale 1e-6, SPM width 64,
    16 deformable heads of 4 points, ConvFFN ratio 0.25, deform ratio 0.5. `embed_dim`, `depth`,
    `num_heads` override the timm architecture (tiny test models). `with_cp`: recompute every
    block, injector and extractor in the backward pass (the official with_cp: memory for time).
    """

    def __init__(self, timm_name: str = BEIT_L, img_size: int = 896, embed_dim: int | None = None,
                 depth: int | None = None, num_heads: int | None = None, in_chans: int = 3, drop_path: float = 0.3,
                 init_values: float = 1e-6, conv_inplane: int = 64, n_points: int = 4, deform_num_heads: int = 16,
                 cffn_ratio: float = 0.25, deform_ratio: float = 0.5,
                 interaction_indexes: Sequence[Sequence[int]] | None = None, with_cp: bool = False) -> None:
        super().__init__()
        if not timm_name.startswith("beit"):
            raise ValueError(f"ViTAdapter builds on timm BEiT models, got {timm_name!r}")
        if img_size % 32:
            raise ValueError(f"img_size {img_size} is not a multiple of 32")
        arch: dict[str, Any] = {k: v for k, v in (("embed_dim", embed_dim), ("depth", depth),
                                                   ("num_heads", num_heads)) if v is not None}
        body = cast(Beit, timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=img_size,
                                            in_chans=in_chans, drop_path_rate=drop_path, init_values=init_values,
                                            **arch))
        if body.pos_embed is not None or body.rel_pos_bias is not None:
            raise ValueError(f"{timm_name}: ViT-Adapter's BEiT has per-block relative position tables and no "
                             "absolute / shared position embedding")
        # The pretraining head and final norms are not part of the backbone (honest counts).
        body.norm, body.fc_norm, body.head = nn.Identity(), nn.Identity(), nn.Identity()
        self.body: Beit = body
        d = int(body.embed_dim)
        self.embed_dim: int = d
        self.num_layers: int = len(body.blocks)
        groups = [list(g) for g in (interaction_indexes or even_groups(self.num_layers))]
        if len(groups) != 4 or [g[0] for g in groups] != [0] + [g[1] + 1 for g in groups[:-1]] or \
                any(len(g) != 2 or g[1] < g[0] for g in groups) or groups[-1][1] != self.num_layers - 1:
            raise ValueError(f"interaction_indexes {groups} must split blocks 0..{self.num_layers - 1} into 4 "
                             "consecutive [first, last] groups")
        self.interaction_indexes: list[list[int]] = groups
        self.grid_size: tuple[int, int] = (img_size // PATCH, img_size // PATCH)

        self.level_embed: nn.Parameter = nn.Parameter(torch.zeros(N_LEVELS, d))
        self.spm: SpatialPriorModule = SpatialPriorModule(conv_inplane, d, in_chans)
        self.interactions: nn.ModuleList = nn.ModuleList(
            InteractionBlock(d, deform_num_heads, n_points, deform_ratio, cffn_ratio, init_values, drop_path,
                             extra_extractors=i == len(groups) - 1, with_cp=with_cp) for i in range(len(groups)))
        self.with_cp: bool = with_cp
        self.up: nn.ConvTranspose2d = nn.ConvTranspose2d(d, d, kernel_size=2, stride=2)
        self.norm1: nn.BatchNorm2d = nn.BatchNorm2d(d)
        self.norm2: nn.BatchNorm2d = nn.BatchNorm2d(d)
        self.norm3: nn.BatchNorm2d = nn.BatchNorm2d(d)
        self.norm4: nn.BatchNorm2d = nn.BatchNorm2d(d)
        for part in (self.up, self.spm, self.interactions):
            part.apply(_init_adapter)
        for mod in self.modules():
            if isinstance(mod, MSDeformAttn):
                mod.reset_parameters()
        nn.init.normal_(self.level_embed)
        self.channels: list[int] = [d] * 4
        self.strides: list[int] = list(STRIDES)

    def forward(self, images: Tensor) -> list[Tensor]:
        """images B x C x H x W (H, W multiples of 32) -> [f1, f2, f3, f4], B x D x H/s x W/s."""
        b = images.shape[0]
        grid = AdapterGrid.of(int(images.shape[-2]), int(images.shape[-1]), images.device)
        (h, w), (h2, w2), (h4, w4) = grid.vit, grid.levels[0], grid.levels[2]
        c1, c2, c3, c4 = self.spm(images)
        c = torch.cat([c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]], dim=1)
        # The patch projection alone: timm's PatchEmbed also insists on img_size, the official one does not.
        x = self.body.pos_drop(self.body.patch_embed.proj(images).flatten(2).transpose(1, 2))
        # repeat, not expand: a view of a parameter made under no_grad trips torch's module
        # tracker (FlopCounterMode) when it enters a module.
        cls = self.body.cls_token.repeat(b, 1, 1)
        run = _BlockRunner(self.body, grid.vit, native=grid.vit == self.grid_size, checkpointed=self.with_cp)
        outs = []
        for inter, (first, last) in zip(self.interactions, self.interaction_indexes):
            x, c, cls = inter(x, c, cls, run.group(first, last), grid)
            outs.append(x.transpose(1, 2).reshape(b, -1, h, w))
        s2, s3 = h2 * w2, h * w
        c2 = c[:, :s2].transpose(1, 2).reshape(b, -1, h2, w2)
        c3 = c[:, s2:s2 + s3].transpose(1, 2).reshape(b, -1, h, w)
        c4 = c[:, s2 + s3:].transpose(1, 2).reshape(b, -1, h4, w4)
        c1 = self.up(c2) + c1
        # Each level adds the ViT tokens of its group, resized to its stride.
        x1, x2, x3, x4 = outs
        c1 = c1 + F.interpolate(x1, scale_factor=4, mode="bilinear", align_corners=False)
        c2 = c2 + F.interpolate(x2, scale_factor=2, mode="bilinear", align_corners=False)
        c3 = c3 + x3
        c4 = c4 + F.interpolate(x4, scale_factor=0.5, mode="bilinear", align_corners=False)
        return [self.norm1(c1), self.norm2(c2), self.norm3(c3), self.norm4(c4)]

    def data_config(self) -> dict:
        """ImageNet mean / std on the 0..255 scale: what the official ADE20K configs normalise
        with (timm's BEiT default config says 0.5 / 0.5)."""
        return {"mean": [m * 255.0 for m in IMAGENET_DEFAULT_MEAN], "std": [s * 255.0 for s in IMAGENET_DEFAULT_STD],
                "interpolation": "bicubic"}


class _BlockRunner:
    """Runs groups of the BEiT's blocks on B x (1 + h*w) x D tokens of one grid: timm's own
    blocks at the grid their tables were built for, else the same blocks with each table
    resized to the grid (inside the block's checkpoint: a bias is heads x N x N)."""

    def __init__(self, body: Beit, grid: tuple[int, int], native: bool, checkpointed: bool) -> None:
        self.blocks = cast(list[BeitBlock], list(body.blocks))
        self.grid = grid
        self.index = None if native else gen_relative_position_index(grid, class_token=True,
                                                                      device=body.cls_token.device)
        self.checkpointed = checkpointed

    def _block(self, blk: BeitBlock, x: Tensor) -> Tensor:
        if self.index is None:
            return blk(x)
        return block_with_bias(blk, x, resized_bias(blk, self.grid, self.index))

    def group(self, first: int, last: int) -> Callable[[Tensor], Tensor]:
        """Blocks first..last as one function B x (1 + N) x D -> B x (1 + N) x D."""
        def run(x: Tensor) -> Tensor:
            for blk in self.blocks[first:last + 1]:
                x = maybe_checkpoint(self.checkpointed, self._block, blk, x)
            return x
        return run


def resized_bias(blk: BeitBlock, grid: tuple[int, int], index: Tensor) -> Tensor:
    """The block's relative position bias for an h x w grid with cls token: heads x N x N,
    N = 1 + h*w, from its table resized bicubically to (2h-1) x (2w-1) (+ the 3 cls entries)."""
    table = blk.attn.relative_position_bias_table
    assert table is not None  # ViTAdapter checks the BEiT has per-block tables
    h, w = grid
    heads = table.shape[1]
    resized = resize_rel_pos_bias_table_simple(table, (h, w), ((2 * h - 1) * (2 * w - 1) + 3, heads))
    n = h * w + 1
    return resized[index.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)


def block_with_bias(blk: BeitBlock, x: Tensor, bias: Tensor) -> Tensor:
    """timm's BEiT block on x B x N x D with `bias` (heads x N x N) as its relative position
    bias: x + gamma_1 * attn(norm1(x)); x + gamma_2 * mlp(norm2(x)), each through drop path."""
    attn = blk.attn
    y = blk.norm1(x)
    b, n, _ = y.shape
    qkv_bias = None if attn.q_bias is None else torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
    qkv = F.linear(y, attn.qkv.weight, qkv_bias).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None].to(q.dtype),
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    y = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b, n, -1)))
    x = x + blk.drop_path1(y if blk.gamma_1 is None else blk.gamma_1 * y)
    y = blk.mlp(blk.norm2(x))
    return x + blk.drop_path2(y if blk.gamma_2 is None else blk.gamma_2 * y)


def load_vit_adapter_weights(backbone: ViTAdapter, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a local checkpoint into `backbone`: an official ViT-Adapter segmentor (its
    `backbone.*`; the decode head is not ours and is reported unexpected), a BEiT pretraining
    checkpoint (timm / unilm / mmseg names; a shared `rel_pos_bias` table is copied into every
    block, tables of another grid are resized to this one) or a ViTAdapter state dict.

    Returns (missing, unexpected) in this module's / the file's names; warns on missing keys.
    Raises `UserError` for a missing file, a wrong suffix, a shape mismatch or no matching key.
    """
    path, sd = read_weights(path, "ViT-Adapter / BEiT")
    unexpected: list[str] = []
    if any(k.startswith("backbone.") for k in sd):  # a whole segmentor: its backbone
        unexpected += [k for k in sd if not k.startswith("backbone.")]
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    sd = {k.removeprefix("body."): v for k, v in sd.items()}  # our own state dict names the BEiT `body`
    adapter = {k: v for k, v in sd.items() if k.startswith(ADAPTER_KEYS)}
    body_sd, neck_sd, rest = split_beit_state({k: v for k, v in sd.items() if k not in adapter})
    unexpected += list(rest) + [f"neck.{k}" for k in neck_sd]

    body = backbone.body
    shared = body_sd.pop("rel_pos_bias.relative_position_bias_table", None)
    body_sd.pop("rel_pos_bias.relative_position_index", None)
    if shared is not None:  # unilm's loader: the pretraining's shared table seeds every block
        for i in range(backbone.num_layers):
            body_sd.setdefault(f"blocks.{i}.attn.relative_position_bias_table", shared)
    # The pretraining classifier and final norms, and index buffers, are not loaded.
    body_sd = {k: v for k, v in body_sd.items()
               if not (k.endswith("relative_position_index") or k.startswith(("head.", "fc_norm.", "norm.")))}
    from timm.models.beit import checkpoint_filter_fn

    body_sd = checkpoint_filter_fn(body_sd, body)  # relative tables / patch embedding resized to this model
    full = {**{f"body.{k}": v for k, v in body_sd.items()}, **adapter}
    own = backbone.state_dict()
    bad = [k for k, v in full.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise UserError(f"backbone_weights: {path} does not fit this ViT-Adapter: {bad[0]} has shape "
                        f"{tuple(full[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}; pick the matching model size")
    if not any(k in own for k in full):
        raise UserError(f"backbone_weights: no key of {path} matches a ViT-Adapter / BEiT backbone; is it one?")
    result = backbone.load_state_dict(full, strict=False)
    if result.missing_keys:
        warnings.warn(f"backbone weights {path.name}: {len(result.missing_keys)} missing keys, "
                      f"e.g. {result.missing_keys[:3]}", stacklevel=2)
    return list(result.missing_keys), unexpected + list(result.unexpected_keys)

