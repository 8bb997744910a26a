"""CIFAR-100 resnet32x4 -> resnet8x4 with KD (mdistiller: CE weight 0.1, KD weight 0.9, T 4).
Published: 73.33.

KD: Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", NIPS Deep Learning
Workshop 2015.
"""
from jaxkd import config as schema

cifar100_common = schema.sibling(__file__, "cifar100_common")


def get_config():
  c = cifar100_common.recipe("resnet32x4", "resnet8x4")
  c.name = "CIFAR-100: resnet32x4 -> resnet8x4, KD"
  c.student.loss = schema.loss("kd", ce_weight=0.1, kd_weight=0.9, temperature=4.0)
  c.report.reference = {
      "source": "Zhao et al., Decoupled Knowledge Distillation, CVPR 2022, CIFAR-100 table",
      "KD top-1": "73.33",
      "applies_to": {"dataset": "cifar100", "teacher": "resnet32x4", "student": "resnet8x4",
                     "loss": "kd", "perception": False}}
  return c
