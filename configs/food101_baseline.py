"""The Food-101 baseline: MobileNetV3-Large without ECA and without KD (cross-entropy only)."""
from jaxkd import config as schema

food101_eca = schema.sibling(__file__, "food101_eca")


def get_config():
  c = food101_eca.get_config()
  c.name = "Food-101: MobileNetV3-Large baseline, CE only"
  c.teacher.enabled = False
  c.student.model = "mobilenet_v3_large"
  c.student.teacher = "none"
  c.student.loss = schema.loss("ce")
  return c
