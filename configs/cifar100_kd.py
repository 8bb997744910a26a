"""CIFAR-100 resnet32x4 -> resnet8x4 with KD (mdistiller: CE weight 0.1, KD weight 0.9, T 4). Published: 73.33."""
from configs import cifar100_common, common


def get_config():
  c = cifar100_common.recipe("resnet32x4", "resnet8x4")
  c.name = "CIFAR-100: resnet32x4 -> resnet8x4, KD"
  c.student.loss = common.loss("kd", ce_weight=0.1, kd_weight=0.9, temperature=4.0)
  c.report.reference = {"source": "REFERENCE.md section 7", "KD top-1": "73.33"}
  return c
