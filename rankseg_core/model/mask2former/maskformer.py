"""MaskFormer's heads inside the Mask2Former model: its two pixel decoders and its standard
transformer decoder, as facebookresearch/MaskFormer's ADE20K configs use them.

- `FPNPixelDecoder` (BasePixelDecoder; every semantic config): res5 -> 3x3 conv (GN, ReLU),
  then top-down over res4, res3, res2: lateral 1x1 conv (GN) + the coarser map upsampled by
  NEAREST neighbour (FPN's rule), 3x3 conv (GN, ReLU); mask features = a 3x3 conv at 1/4. The
  transformer decoder reads the raw res5 map (TRANSFORMER_IN_FEATURE "res5").
- `TransformerEncoderPixelDecoder` (the ADE20K panoptic config): the same FPN, but res5 first
  goes through a 1x1 conv and `enc_layers` post-norm DETR encoder layers (sine positions); the
  top 3x3 conv reads the encoder output, which is also what the decoder reads
  (TRANSFORMER_IN_FEATURE "transformer_encoder").
- `StandardTransformerDecoder` (TransformerPredictor with ENC_LAYERS 0, DETR's decoder):
  Q queries start at zero with learned position embeddings; each post-norm layer runs
  self-attention -> cross-attention to the memory (1x1 conv to hidden_dim when the widths
  differ; sine positions) -> FFN. The shared decoder LayerNorm of every layer's output gives
  that layer's prediction (deep supervision): masks = 3-layer MLP of it . mask features. One
  scale, no attention mask, no prediction from the learnable queries: L predictions for L
  layers. The class head is the model's (model.py), as for the masked decoder.

Parameters and initialisation follow the official modules (c2_xavier on the convs, xavier on
the transformer's matrices); parameter names do not (no official-checkpoint loader).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.config.mask2former import Mask2FormerConfig
from rankseg_core.model.mask2former.decoder import CrossAttentionLayer, DecoderOutput, FFNLayer, SelfAttentionLayer
from rankseg_core.model.mask2former.layers import MLP, c2_xavier_, group_norm
from rankseg_core.model.position import sine_position_embedding


def pixel_decoder_kind(cfg: Mask2FormerConfig) -> str:
    """The configured MaskFormer pixel decoder, None resolved to the official one: the
    transformer-encoder FPN for the panoptic task (the ADE20K panoptic config), else the FPN."""
    kind = cfg.maskformer.pixel_decoder
    if kind is not None:
        return kind
    return "transformer_fpn" if cfg.task == "panoptic" else "fpn"


class ConvGN(nn.Sequential):
    """detectron2's Conv2d(norm="GN"[, activation=relu]): conv without bias, GroupNorm, ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, relu: bool) -> None:
        conv = nn.Conv2d(cin, cout, kernel_size=kernel, padding=kernel // 2, bias=False)
        c2_xavier_(conv)
        super().__init__(conv, group_norm(cout), *([nn.ReLU()] if relu else []))


class EncoderLayer(nn.Module):
    """DETR's post-norm encoder layer: self-attention (positions on queries and keys), then FFN."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = SelfAttentionLayer(dim, heads, dropout)
        self.ffn = FFNLayer(dim, ffn, dropout)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        """src, pos B x S x D -> B x S x D."""
        return self.ffn(self.self_attn(src, pos))


class FPNPixelDecoder(nn.Module):
    """[res2, res3, res4, res5] -> (mask features B x mask_dim x H/4 x W/4, [memory]) where
    memory is what the transformer decoder reads: res5 itself (B x C5 x H/32 x W/32)."""

    def __init__(self, in_channels: list[int], conv_dim: int, mask_dim: int, top_channels: int | None = None) -> None:
        super().__init__()
        # The top level has no lateral: its output conv reads res5 (or the encoder's map) directly.
        self.top = ConvGN(in_channels[-1] if top_channels is None else top_channels, conv_dim, 3, relu=True)
        self.laterals = nn.ModuleList(ConvGN(c, conv_dim, 1, relu=False) for c in in_channels[:-1])
        self.outputs = nn.ModuleList(ConvGN(conv_dim, conv_dim, 3, relu=True) for _ in in_channels[:-1])
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)
        c2_xavier_(self.mask_features)
        self.memory_channels = in_channels[-1]

    def encode_top(self, res5: Tensor) -> tuple[Tensor, Tensor]:
        """(top FPN level B x conv_dim x h x w, the decoder's memory)."""
        return self.top(res5), res5

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        y, memory = self.encode_top(feats[-1])
        for i in range(len(feats) - 2, -1, -1):  # res4, res3, res2
            lateral = self.laterals[i](feats[i])
            y = self.outputs[i](lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest"))
        return self.mask_features(y), [memory]


class TransformerEncoderPixelDecoder(FPNPixelDecoder):
    """The FPN with a transformer encoder on res5; memory = the encoder's output
    (B x conv_dim x H/32 x W/32)."""

    def __init__(self, in_channels: list[int], conv_dim: int, mask_dim: int, layers: int, heads: int, ffn: int,
                 dropout: float) -> None:
        super().__init__(in_channels, conv_dim, mask_dim, top_channels=conv_dim)
        self.input_proj = nn.Conv2d(in_channels[-1], conv_dim, kernel_size=1)
        c2_xavier_(self.input_proj)
        self.encoder = nn.ModuleList(EncoderLayer(conv_dim, heads, ffn, dropout) for _ in range(layers))
        self.memory_channels = conv_dim

    def encode_top(self, res5: Tensor) -> tuple[Tensor, Tensor]:
        x = self.input_proj(res5)
        b, d, h, w = x.shape
        pos = sine_position_embedding(h, w, d, x.device).flatten(1).t()[None].expand(b, -1, -1)
        src = x.flatten(2).transpose(1, 2)
        for layer in self.encoder:
            src = layer(src, pos)
        enc = src.transpose(1, 2).reshape(b, d, h, w)
        return self.top(enc), enc


class DetrDecoderLayer(nn.Module):
    """DETR's post-norm decoder layer: self-attention, cross-attention, FFN (each + residual,
    then LayerNorm); the query positions enter every attention's queries (and self-attention's
    keys), the memory positions the cross-attention's keys."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = SelfAttentionLayer(dim, heads, dropout)
        self.cross_attn = CrossAttentionLayer(dim, heads, dropout)
        self.ffn = FFNLayer(dim, ffn, dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        """tgt / query_pos B x Q x D, memory / pos B x S x D -> B x Q x D."""
        return self.ffn(self.cross_attn(self.self_attn(tgt, query_pos), memory, None, pos, query_pos))


class StandardTransformerDecoder(nn.Module):
    """MaskFormer's transformer predictor without its class head (see the module docstring)."""

    def __init__(self, in_channels: int, cfg: Mask2FormerConfig, num_queries: int) -> None:
        super().__init__()
        d, mf = cfg.hidden_dim, cfg.maskformer
        self.layers = nn.ModuleList(DetrDecoderLayer(d, cfg.nheads, cfg.dim_feedforward, mf.dropout)
                                    for _ in range(mf.dec_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.query_embed = nn.Embedding(num_queries, d)
        # The official predictor projects only when the widths differ (ENFORCE_INPUT_PROJ False).
        self.input_proj: nn.Conv2d | None = None
        if in_channels != d:
            self.input_proj = nn.Conv2d(in_channels, d, kernel_size=1)
            c2_xavier_(self.input_proj)
        self.mask_embed = MLP(d, d, cfg.mask_dim, 3)

    def forward(self, scales: list[Tensor], mask_features: Tensor) -> DecoderOutput:
        """scales: [memory B x C x h x w] (the pixel decoder's second output); mask_features
        B x mask_dim x H/4 x W/4 -> L predictions (embeds, masks) and the L raw query features."""
        x = scales[0]
        b, _, h, w = x.shape
        d = self.decoder_norm.normalized_shape[0]
        pos = sine_position_embedding(h, w, d, x.device).flatten(1).t()[None].expand(b, -1, -1)
        memory = (self.input_proj(x) if self.input_proj is not None else x).flatten(2).transpose(1, 2)
        # repeat, not expand: a view of a parameter trips torch's module tracker (FlopCounterMode)
        query_pos = self.query_embed.weight[None].repeat(b, 1, 1)
        output = torch.zeros_like(query_pos)
        out = DecoderOutput([], [], [])
        for layer in self.layers:
            output = layer(output, memory, pos, query_pos)
            emb = self.decoder_norm(output)
            out.embeds.append(emb)
            out.masks.append(torch.einsum("bqc,bchw->bqhw", self.mask_embed(emb), mask_features))
            out.queries.append(output)
        return out


def build_maskformer_heads(in_channels: list[int], cfg: Mask2FormerConfig, num_queries: int
                           ) -> tuple[FPNPixelDecoder, StandardTransformerDecoder]:
    """The pixel decoder (`pixel_decoder_kind`) and the standard decoder reading its memory."""
    mf = cfg.maskformer
    kind = pixel_decoder_kind(cfg)
    pixel: FPNPixelDecoder
    if kind == "fpn":
        pixel = FPNPixelDecoder(in_channels, cfg.conv_dim, cfg.mask_dim)
    elif kind == "transformer_fpn":
        # The official encoder takes the decoder's MASK_FORMER.{NHEADS, DIM_FEEDFORWARD, DROPOUT}.
        pixel = TransformerEncoderPixelDecoder(in_channels, cfg.conv_dim, cfg.mask_dim, cfg.enc_layers, cfg.nheads,
                                               cfg.dim_feedforward, mf.dropout)
    else:
        raise ValueError(f"unknown MaskFormer pixel decoder {kind!r}")
    return pixel, StandardTransformerDecoder(pixel.memory_channels, cfg, num_queries)
