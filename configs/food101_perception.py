"""The Food-101 pipeline with DKD + perception reconstruction: teacher and student logits are
standardised per class over the global batch before DKD."""
from jaxkd import config as schema

food101_dkd = schema.sibling(__file__, "food101_dkd")


def get_config():
  c = food101_dkd.get_config()
  c.name = "Food-101: ResNet-50 -> MobileNetV3-Large + ECA, DKD + perception reconstruction"
  c.student.loss.perception = True
  return c
