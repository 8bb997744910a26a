"""CIFAR-100 resnet32x4 -> resnet8x4 with DKD + perception reconstruction (seed 004). Published: 76.90."""
from configs import cifar100_dkd


def get_config():
  c = cifar100_dkd.get_config()
  c.name = "CIFAR-100: resnet32x4 -> resnet8x4, DKD + perception reconstruction"
  c.student.loss.perception = True
  c.report.reference = {"source": "REFERENCE.md section 7 (seed 004)", "DKD + perception top-1": "76.90"}
  return c
