"""CIFAR-100 resnet32x4 -> resnet8x4 with DKD (CE 1.0, alpha 1, beta 8, T 4, 20-epoch warm-up).
Published: 76.32.

DKD: Zhao, Cui, Song, Qiu and Liang, "Decoupled Knowledge Distillation", CVPR 2022.
"""
from jaxkd import config as schema

cifar100_common = schema.sibling(__file__, "cifar100_common")


def get_config():
  c = cifar100_common.recipe("resnet32x4", "resnet8x4")
  c.name = "CIFAR-100: resnet32x4 -> resnet8x4, DKD"
  c.student.loss = schema.loss("dkd", ce_weight=1.0, kd_weight=1.0, alpha=1.0, beta=8.0,
                               temperature=4.0, warmup_epochs=20.0)
  c.report.reference = {
      "source": "Zhao et al., Decoupled Knowledge Distillation, CVPR 2022, CIFAR-100 table",
      "DKD top-1": "76.32",
      "applies_to": {"dataset": "cifar100", "teacher": "resnet32x4", "student": "resnet8x4",
                     "loss": "dkd", "perception": False}}
  return c
