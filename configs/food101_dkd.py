"""The Food-101 pipeline with DKD (Zhao et al., "Decoupled Knowledge Distillation", CVPR
2022) instead of KD: CE + DKD (alpha 1, beta 8, T 4), the DKD term warmed up linearly over the
first 20% of the student's epochs (4 of 20)."""
from jaxkd import config as schema

food101_eca = schema.sibling(__file__, "food101_eca")


def get_config():
  c = food101_eca.get_config()
  c.name = "Food-101: ResNet-50 -> MobileNetV3-Large + ECA, DKD"
  c.student.loss = schema.loss("dkd", ce_weight=1.0, kd_weight=1.0, alpha=1.0, beta=8.0,
                               temperature=4.0)
  c.student.loss.warmup_epochs = 4.0
  return c
