"""Image decoding, augmentation and normalisation (the tf.data side of jaxkd).

Everything here is a pure TensorFlow function of an encoded image (or a batch) and
an explicit stateless seed (``int64 [2]``), so the same seed always gives the same
pixels, whatever thread, host or restart produced them. The package has one module
per job, and re-exports their public names (``from jaxkd.data import augment;
augment.train_preprocess``):

* ``config``: ``AugmentConfig`` (the ``data.augment`` config keys) and ``as_config``;
* ``ops``: seeds, decoding, crop windows, resizing, normalisation, colour jitter, the
  RandAugment / AutoAugment image operations and Random Erasing;
* ``policies``: ``randaugment``, ``autoaugment_imagenet`` and the per-example pipelines
  ``train_preprocess`` / ``eval_preprocess``;
* ``mixing``: MixUp / CutMix over a batch (``mix_batch``).

Per-example training pipeline (``train_preprocess``), in this order:

1. Decode + crop, one of
   * ``random_resized_crop`` (Szegedy et al., "Going Deeper with Convolutions",
     CVPR 2015; torchvision's RandomResizedCrop): a box of area
     ``s * H * W`` with ``s ~ U(rrc_scale)`` and aspect ratio
     ``r ~ logU(rrc_ratio)`` from ``tf.image.stateless_sample_distorted_bounding_box``
     (10 attempts, else the whole image), decoded with the fused
     ``tf.image.decode_and_crop_jpeg`` so only the box is decoded, then resized
     to ``image_size``;
   * ``resize_random_crop`` (the Food-101 KD + ECA manuscript, see References):
     resize so the longest side is ``resize_longest`` (Food-101 already is 512), then a
     random ``image_size`` square crop (zero-padded when the image is smaller).
2. Horizontal flip with probability 1/2 (``flip``).
3. Colour jitter ``(brightness, contrast, saturation, hue)`` as torchvision's
   ColorJitter, in that fixed order: factors ``f ~ U(max(0, 1-b), 1+b)`` blend the
   image with black / its mean grey / its greyscale version,
   ``out = other + f * (img - other)``; hue shifts by ``d ~ U(-h, h)`` turns. The
   factors and the flip are drawn by TensorFlow; the flip, the jitter and the normalisation of
   step 5 run as one XLA-compiled function (``compiled_flip_jitter_normalize``) when no
   RandAugment / AutoAugment stands between them.
4. ``randaugment`` (Cubuk et al., CVPR Workshops 2020) or ``autoaugment='imagenet'``
   (Cubuk et al., CVPR 2019), see ``RANDAUGMENT_OPS`` / ``AUTOAUGMENT_IMAGENET_POLICY``.
5. Normalise with the ImageNet mean/std (``MEAN_RGB``/``STD_RGB``, the only place
   these constants live): ``x = (pixel/255 - mean) / std``.
With ``color_on_device`` the host stops after steps 1 and 2 (``train_preprocess_uint8``: uint8
pixels and the jitter factors of step 3) and the train step does 3 and 5 on the device
(``jaxkd.train.color``); steps 4 and 6 and MixUp/CutMix are then refused.

6. Random Erasing (Zhong et al., AAAI 2020) with probability ``random_erasing``
   (the 2025 KD article, see References, uses 0.3): area ``U(0.02, 1/3)`` of the image,
   aspect ratio ``logU(0.3, 1/0.3)``, filled with N(0, 1) noise (``'pixel'``) or zeros
   (``'zero'``), in normalised units.

Batch-level (``mix_batch``): MixUp (Zhang et al., ICLR 2018),
``x = lam x_i + (1 - lam) x_j`` with ``lam ~ Beta(a, a)`` or ``U(mixup_lambda_range)``
(the 2025 KD article: ``(0.2, 0.4)``), and CutMix (Yun et al., ICCV 2019), which pastes a
box of area ``(1 - lam) H W`` from ``x_j`` and recomputes ``lam`` from the box actually
pasted. The labels are mixed with the same ``lam`` (``soft_label``). Stored
``teacher_logits`` (precomputed per image on its eval view) are NOT mixed here: the batch
keeps each example's own ``t_i`` and gains the partner's ``t_j`` as
``mix_teacher_logits``, because the right mix is of the teacher's probabilities at the
loss's temperature, after logit standardisation / perception reconstruction, which only
the train step knows (``jaxkd.train.step`` mixes
``lam softmax(t_i / T) + (1 - lam) softmax(t_j / T)``; its module docstring explains why
not the logits).

Evaluation (``eval_preprocess``): resize the shorter side to
``image_size / eval_crop_fraction`` (0.875 -> 256 for 224) and take the centre
``image_size`` square; computed as a centre crop of side
``eval_crop_fraction * min(H, W)`` decoded with ``decode_and_crop_jpeg`` and resized.

Non-JPEG inputs (PNG from TFDS cifar, BMP, GIF, PNG files named .jpg in ImageNet)
take the ``tf.io.decode_image(channels=3, expand_animations=False)`` path; every
decode asks for 3 channels, so greyscale images come out RGB.

References:

* Szegedy, Liu, Jia, Sermanet, Reed, Anguelov, Erhan, Vanhoucke and Rabinovich, "Going
  Deeper with Convolutions", CVPR 2015.
* Cubuk, Zoph, Mane, Vasudevan and Le, "AutoAugment: Learning Augmentation Strategies from
  Data", CVPR 2019.
* Cubuk, Zoph, Shlens and Le, "RandAugment: Practical Automated Data Augmentation with a
  Reduced Search Space", CVPR Workshops 2020.
* Zhong, Zheng, Kang, Li and Yang, "Random Erasing Data Augmentation", AAAI 2020.
* Zhang, Cisse, Dauphin and Lopez-Paz, "mixup: Beyond Empirical Risk Minimization",
  ICLR 2018.
* Yun, Han, Oh, Chun, Choe and Yoo, "CutMix: Regularization Strategy to Train Strong
  Classifiers with Localizable Features", ICCV 2019.
* The Food-101 KD + ECA manuscript: "A lightweight food image classification model based
  on knowledge distillation and the ECA attention mechanism" (in Chinese; it names no
  authors, venue or year): ResNet-50 teacher, MobileNetV3-Large + ECA student, images
  resized to a longest side of 512, random crop, flip, colour jitter.
* The 2025 KD article: "Knowledge distillation in image classification: from principles
  to diagrams" (an online article in Chinese, 2025; no author named), which pairs KD with
  AutoAugment, Random Erasing (p = 0.3), MixUp (lambda in [0.2, 0.4]) and CutMix.
"""
from jaxkd.data.augment.config import TRAIN_CROPS, AugmentConfig, as_config
from jaxkd.data.augment.mixing import mix_batch
from jaxkd.data.augment.ops import (
    ERASING_MODES,
    MEAN_RGB,
    STD_RGB,
    apply_color_jitter,
    apply_op,
    center_crop_window,
    color_jitter,
    color_jitter_factors,
    decode_and_crop,
    decode_image,
    denormalize,
    image_shape,
    normalize,
    op_autocontrast,
    op_brightness,
    op_color,
    op_contrast,
    op_equalize,
    op_identity,
    op_invert,
    op_posterize,
    op_rotate,
    op_sharpness,
    op_shear_x,
    op_shear_y,
    op_solarize,
    op_translate_x,
    op_translate_y,
    random_erasing,
    random_resized_crop_window,
    split_seed,
)
from jaxkd.data.augment.policies import (
    AUTOAUGMENT_IMAGENET_POLICY,
    RANDAUGMENT_OPS,
    autoaugment_imagenet,
    compiled_flip_jitter_normalize,
    eval_preprocess,
    flip_decision,
    randaugment,
    train_preprocess,
    train_preprocess_uint8,
)

__all__ = [
    # config
    "AugmentConfig", "as_config", "TRAIN_CROPS",
    # ops
    "MEAN_RGB", "STD_RGB", "ERASING_MODES", "split_seed", "decode_image", "image_shape",
    "decode_and_crop", "random_resized_crop_window", "center_crop_window", "normalize",
    "denormalize", "color_jitter", "color_jitter_factors", "apply_color_jitter", "apply_op",
    "random_erasing",
    "op_identity", "op_autocontrast", "op_equalize", "op_invert", "op_rotate", "op_shear_x",
    "op_shear_y", "op_translate_x", "op_translate_y", "op_solarize", "op_posterize",
    "op_color", "op_contrast", "op_brightness", "op_sharpness",
    # policies
    "RANDAUGMENT_OPS", "AUTOAUGMENT_IMAGENET_POLICY", "randaugment", "autoaugment_imagenet",
    "train_preprocess", "train_preprocess_uint8", "eval_preprocess",
    "compiled_flip_jitter_normalize", "flip_decision",
    # mixing
    "mix_batch",
]
