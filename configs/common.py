"""Defaults shared by every experiment config; each configs/<name>.py edits a copy.

Every key an experiment understands exists here, so a typo in a command-line
override (--config.student.epochz=5) is refused by ml_collections before any work.
"""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def optimizer(name: str = "adam", **overrides) -> ml_collections.ConfigDict:
  """Optimizer + learning-rate schedule (jaxkd.train.optim.make_optimizer / make_schedule)."""
  base = dict(optimizer=name, learning_rate=1e-3, weight_decay=1e-4, decay_1d_params=True, momentum=0.9,
              nesterov=False, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=placeholder(float), schedule="one_cycle",
              pct_start=0.3, div_factor=25.0, final_div_factor=1e4, anneal="cos", three_phase=False,
              cycle_momentum=True, base_momentum=0.85, max_momentum=0.95,
              milestones=(), milestone_steps=placeholder(tuple), lr_decay=0.1, warmup_steps=0)
  base.update(overrides)
  return ml_collections.ConfigDict(base)


def loss(kind: str = "ce", **overrides) -> ml_collections.ConfigDict:
  """Loss of the train step (jaxkd.train.step.LossConfig fields). `warmup_epochs` (DKD's linear
  warm-up of the distillation term, mdistiller: 20 of 240 epochs) is converted to `warmup` steps."""
  base = dict(kind=kind, label_smoothing=0.0, ce_weight=1.0, kd_weight=1.0, kd_alpha=placeholder(float), temperature=4.0,
              alpha=1.0, beta=8.0, warmup=0, warmup_epochs=0.0, perception=False, perception_eps=1e-6, standardize=False,
              standardize_eps=1e-7, feature_losses=())
  base.update(overrides)
  return ml_collections.ConfigDict(base)


def stage(model: str, *, epochs: int, batch_size: int, opt=None, loss_config=None,
          **overrides) -> ml_collections.ConfigDict:
  base = dict(enabled=True, model=model, model_kwargs={}, pretrained=placeholder(str), epochs=epochs, batch_size=batch_size,
              optimizer=opt or optimizer(), loss=loss_config or loss("ce"), log_every_steps=50,
              checkpoint_every_steps=500, keep_checkpoints=2, max_steps=placeholder(int), eval_every_epochs=1)
  base.update(overrides)
  return ml_collections.ConfigDict(base)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "jaxkd experiment"
  c.seed = 0
  c.dtype = "auto"  # 'auto': bfloat16 compute on GPU/TPU, float32 on CPU; or 'float32' / 'bfloat16'
  c.data = ml_collections.ConfigDict(dict(
      name="food101", data_dir=placeholder(str), manual_dir=placeholder(str), val_fraction=0.2, split_seed=0, download=True,
      version=placeholder(str), num_parallel_calls=placeholder(int)))
  c.augment = ml_collections.ConfigDict(dict(
      image_size=224, train_crop="random_resized_crop", rrc_scale=(0.08, 1.0), rrc_ratio=(3 / 4, 4 / 3),
      resize_longest=512, crop_padding=4, flip=True, color_jitter=(0.0, 0.0, 0.0, 0.0), randaugment_num_ops=0,
      randaugment_magnitude=9.0, autoaugment=placeholder(str), random_erasing=0.0, random_erasing_mode="pixel",
      mixup_alpha=0.0, mixup_lambda_range=placeholder(tuple), cutmix_alpha=0.0, mix_prob=1.0, mix_switch_prob=0.5,
      eval_crop_fraction=0.875, antialias=True, dtype="float32"))
  c.teacher = stage("resnet50", epochs=3, batch_size=32)
  c.teacher_logits = ml_collections.ConfigDict(dict(dtype="float16", batch_size=64))
  c.student = stage("mobilenet_v3_large", epochs=20, batch_size=32, teacher="stored")
  c.evaluate = ml_collections.ConfigDict(dict(splits=("val", "test"), batch_size=64))
  c.report = ml_collections.ConfigDict(dict(reference={}))
  return c
