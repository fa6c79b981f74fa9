"""Video Mask2Former (Mask2Former-VIS, the official `mask2former_video`) + clip-level RankSeg.

A clip of T frames is one sample. The backbone and the pixel decoder run per frame (as the
official code: frames are the batch dimension there); the transformer decoder keeps ONE set of
Q queries per clip, which
- cross-attend to the multi-scale features of all T frames at once (memory flattened over
  t, h, w, with the 3-D sine position encoding over (t, y, x): `sine_position_embedding_3d`),
  masked by the previous prediction over the whole clip (a query whose mask is empty in every
  frame attends everywhere);
- predict one class per query and one mask per query and frame: the query's mask embedding
  dotted with each frame's mask features -> B x Q x T x h x w.
RankSeg as the official fork applies it to video: the ml head reads the clip queries after
layer `ml_query_layer` (one multi-label ranking per clip; its target is the union of the
clip's classes), the top-kappa selection is made once per clip (so it is the same for every
frame), and the class columns / rank LayerNorm are the image model's.

The parameters are exactly the image model's (this class only changes how the decoder runs),
so a checkpoint moves between the two; with T = 1 both compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rankseg_core.config.model import ModelConfig
from rankseg_core.model.heads import FILL_LOGIT
from rankseg_core.model.mask2former.backbone import load_pyramid_weights
from rankseg_core.model.mask2former.decoder import DecoderOutput, MaskedTransformerDecoder
from rankseg_core.model.mask2former.model import Features, Mask2FormerModel, Mask2FormerOutput
from rankseg_core.model.mask2former.multilabel import mask_invalid, selected_logits, with_no_object
from rankseg_core.model.position import sine_position_embedding_3d
from rankseg_core.model.selection import NO_SELECTION, Selection, allowed_classes, resolve_override, select


@dataclass
class VideoMask2FormerOutput(Mask2FormerOutput):
    """What the video model returns (B clips of T frames, Q queries per clip).

    As `Mask2FormerOutput`, except: pred_masks B x Q x T x h x w (and so every aux mask);
    pred_logits B x Q x (C+1), ml_logits B x K, topk_index / valid B x C are per CLIP (every
    frame of a clip shares them); clip_len = T.
    """

    clip_len: int = 1


def frame_output(out: VideoMask2FormerOutput) -> Mask2FormerOutput:
    """Per-frame view of a clip output, for the image inference (semantic / panoptic maps):
    masks (B*T) x Q x h x w, the clip's logits / ml logits / selection repeated for each of its
    T frames (consecutive, as the input). Aux outputs are dropped (inference reads the last
    layer only). Per-frame semantic scores sum_q softmax(class_q) * sigmoid(mask_q,t) are then
    exactly the clip model's scores of frame t."""
    t = out.clip_len

    def rep(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.repeat_interleave(t, dim=0)

    logits = rep(out.pred_logits)
    assert logits is not None
    return Mask2FormerOutput(pred_logits=logits, pred_masks=out.pred_masks.transpose(1, 2).flatten(0, 1),
                             aux=[], ml_logits=rep(out.ml_logits), topk_index=rep(out.topk_index),
                             valid=rep(out.valid), image_size=out.image_size, num_classes=out.num_classes)


class VideoMaskedTransformerDecoder(MaskedTransformerDecoder):
    """The masked-attention decoder over clips: same parameters as the image decoder.

    forward(scales, mask_features, clip_len): scales [1/32, 1/16, 1/8] maps (B*T) x C x h x w,
    mask_features (B*T) x mask_dim x H x W, frames of a clip consecutive -> DecoderOutput with
    embeds / queries B x Q x D and masks B x Q x T x H x W.
    """

    def _predict_clip(self, output: Tensor, mask_features: Tensor, attn_size: tuple[int, int]
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """output B x Q x D, mask_features B x T x D' x H x W -> (normed embeddings B x Q x D,
        mask logits B x Q x T x H x W, attention mask (B*heads) x Q x (T*h*w), True = blocked)."""
        emb = self.decoder_norm(output)
        masks = torch.einsum("bqc,btchw->bqthw", self.mask_embed(emb), mask_features)
        with torch.no_grad():
            b, q, t = masks.shape[:3]
            small = F.interpolate(masks.detach().flatten(0, 2)[:, None], size=attn_size, mode="bilinear",
                                  align_corners=False)
            # t-major, then h, w: the order in which the memory is flattened
            blocked = small.reshape(b, q, t * attn_size[0] * attn_size[1]).sigmoid() < 0.5
            # Empty over the WHOLE clip -> attend everywhere (the official rule, applied to the
            # T*h*w keys of the clip, not per frame).
            blocked &= ~blocked.all(-1, keepdim=True)
            attn = blocked.repeat_interleave(self.num_heads, dim=0)
        return emb, masks, attn

    def forward(self, scales: list[Tensor], mask_features: Tensor, clip_len: int = 1) -> DecoderOutput:
        bt = mask_features.shape[0]
        if bt % clip_len:
            raise ValueError(f"{bt} frames are not whole clips of {clip_len}")
        b, t = bt // clip_len, clip_len
        d = self.decoder_norm.normalized_shape[0]
        srcs, pos, sizes = [], [], []
        for i, x in enumerate(scales):
            h, w = int(x.shape[-2]), int(x.shape[-1])
            sizes.append((h, w))
            # t x D x h x w -> (t*h*w) x D, the same for every clip
            p = sine_position_embedding_3d(t, h, w, d, x.device).permute(0, 2, 3, 1).reshape(t * h * w, d)
            pos.append(p[None].expand(b, -1, -1))
            x = self.input_proj[i](x) if self.input_proj is not None else x
            src = x.flatten(2).transpose(1, 2) + self.level_embed.weight[i]  # (B*T) x hw x D
            srcs.append(src.reshape(b, t * h * w, d))  # frames of a clip consecutive -> t-major keys
        mf = mask_features.reshape(b, t, *mask_features.shape[1:])
        return self._layers(srcs, pos, sizes, mf, self._predict_clip)


class VideoMask2FormerModel(Mask2FormerModel):
    """Clips of `clip_len` frames: images (B*T) x 3 x H x W, the T frames of a clip consecutive.

    `forward_features` is the image model's (per frame); `forward_head` runs the pixel decoder
    per frame, the decoder per clip, and the class head / RankSeg selection per clip.
    """

    def __init__(self, cfg: ModelConfig, arch: str, num_queries: int, clip_len: int | None = None) -> None:
        super().__init__(cfg, arch, num_queries)
        self.clip_len = clip_len if clip_len is not None else cfg.clip_len
        # A class swap, not a new module: the clip decoder has exactly the image decoder's
        # parameters, so names, initialisation and the random stream (same seed -> same
        # weights as the image model) are unchanged.
        self.decoder.__class__ = VideoMaskedTransformerDecoder

    def forward_head(self, feats: Features, selection: Selection = NO_SELECTION,
                     clip_len: int | None = None) -> VideoMask2FormerOutput:
        """Features of B*T frames -> VideoMask2FormerOutput of B clips.

        clip_len: frames per clip at this forward (default the model's; the official inference
            feeds a whole video as one clip). selection: as the image model's; per-frame
            `override` / `gt_classes` lists are merged per clip (model/selection.py `per_clip`).
        """
        t = clip_len or self.clip_len
        mask_features, scales = self.pixel_decoder(feats.maps)
        dec = self.decoder(scales, mask_features, t)
        b = mask_features.shape[0] // t
        ml_logits = self.ml_head(dec.queries[self.ml_query_layer - 1]) if self.ml_head is not None else None
        device = mask_features.device
        override = resolve_override(selection, self.oracle, ml_logits, b, t)
        index = valid = None
        w, bias = self.class_embed.weight, self.class_embed.bias
        if self.selects:  # one selection per clip: every frame of the clip shares its columns
            index, valid = select(ml_logits, self.num_classes, selection.kappa or self.kappa, device,
                                  dynamic_threshold=selection.dynamic_threshold, override=override, by_id=self.oracle)
            cols, ok = with_no_object(index, valid, self.num_classes)
            logits = [selected_logits(e, w, bias, cols, self.cosine) for e in dec.embeds]
            if self.ml_norm is not None:
                logits = [self.ml_norm(x, ok if valid is not None else None) for x in logits]
            else:
                logits = [mask_invalid(x, ok if valid is not None else None) for x in logits]
        else:
            cols = torch.arange(self.num_classes + 1, device=device).expand(b, -1)
            logits = [selected_logits(e, w, bias, cols, self.cosine) for e in dec.embeds]
            if self.ml_norm is not None:
                logits = [self.ml_norm(x) for x in logits]
            if override is not None:
                valid = allowed_classes(override, self.num_classes, device)
                keep = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)
                logits = [x.masked_fill(~keep[:, None, :], FILL_LOGIT) for x in logits]
        aux = list(zip(logits[:-1], dec.masks[:-1]))
        return VideoMask2FormerOutput(pred_logits=logits[-1], pred_masks=dec.masks[-1], aux=aux,
                                      ml_logits=ml_logits, topk_index=index, valid=valid,
                                      image_size=feats.image_size, num_classes=self.num_classes, clip_len=t)

    def forward(self, images: Tensor, selection: Selection = NO_SELECTION,
                clip_len: int | None = None) -> VideoMask2FormerOutput:
        """images (B*T) x 3 x H x W normalised, the T frames of each clip consecutive."""
        t = clip_len or self.clip_len
        if images.shape[0] % t:
            raise ValueError(f"{images.shape[0]} frames are not whole clips of {t} frames")
        return self.forward_head(self.forward_features(images), selection, t)


def build_video_mask2former(cfg: ModelConfig, arch: str, num_queries: int,
                            clip_len: int | None = None) -> VideoMask2FormerModel:
    """Validate `cfg`, build the clip model (T = clip_len, default cfg.clip_len) on the timm
    backbone `arch` and load local backbone weights if given."""
    cfg.validate()
    model = VideoMask2FormerModel(cfg, arch, num_queries, clip_len)
    if cfg.backbone_weights:
        load_pyramid_weights(model.backbone, cfg.backbone_weights)
    return model
