"""Pixel constants shared by the tf.data preprocessing, the train step and the exported model,
in a module that imports nothing (no TensorFlow, no JAX).

MEAN_RGB / STD_RGB: the ImageNet statistics (RGB, fractions of 255) that every torchvision and
timm ImageNet-pretrained model expects; an image is normalised as (pixel / 255 - mean) / std.
GRAY_WEIGHTS: ITU-R BT.601 luma weights, the greyscale of PIL's ``convert('L')`` and of
torchvision's colour jitter.
"""
MEAN_RGB: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD_RGB: tuple[float, float, float] = (0.229, 0.224, 0.225)
GRAY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
