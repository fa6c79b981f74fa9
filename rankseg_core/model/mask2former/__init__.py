"""Mask2Former (masked-attention mask transformer) with the RankSeg multi-label head.

Modules, one concern each (data flows top to bottom):
    backbone.py       timm ResNet-50 / Swin as a stride 4/8/16/32 NCHW feature pyramid
    detectron2_weights.py  detectron2 checkpoints -> our names: backbones and whole official models
    vit_adapter.py    ViT-Adapter (BEiT + spatial prior, injectors, extractors): the same pyramid
    deform_attn.py    multi-scale deformable attention in plain PyTorch (grid_sample)
    pixel_decoder.py  6-layer deformable encoder + FPN level -> mask features, 3 scales
    decoder.py        masked-attention transformer decoder, per-layer mask predictions
    multilabel.py     RankSeg multi-label head and the rank LayerNorm
    maskformer.py     MaskFormer's FPN / transformer-encoder pixel decoders and DETR decoder
    semask.py         SeMask Swin: semantic layers after each stage, the semantic prior
    model.py          Mask2FormerModel / Mask2FormerOutput / build_mask2former
    video.py          the video (clip) model of Mask2Former-VIS

Its options are `rankseg_core.config.mask2former`; its losses, matcher and targets live in
`rankseg_core.losses`, its semantic / panoptic inference in `rankseg_core.inference`.
"""
