"""Seed 000's pipeline with DKD + perception reconstruction (seed 004): teacher and student logits are
standardised per class over the global batch before DKD."""
from configs import food101_dkd


def get_config():
  c = food101_dkd.get_config()
  c.name = "Food-101: ResNet-50 -> MobileNetV3-Large + ECA, DKD + perception reconstruction"
  c.student.loss.perception = True
  return c
