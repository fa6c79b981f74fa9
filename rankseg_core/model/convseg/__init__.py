"""Convolutional segmentation models (DeepLabv3, UperNet) and their backbones."""
