"""CIFAR-100 resnet32x4 -> resnet8x4 with DKD (CE 1.0, alpha 1, beta 8, T 4, 20-epoch warm-up). Published: 76.32."""
from configs import cifar100_common, common


def get_config():
  c = cifar100_common.recipe("resnet32x4", "resnet8x4")
  c.name = "CIFAR-100: resnet32x4 -> resnet8x4, DKD"
  c.student.loss = common.loss("dkd", ce_weight=1.0, kd_weight=1.0, alpha=1.0, beta=8.0, temperature=4.0,
                               warmup_epochs=20.0)
  c.report.reference = {"source": "REFERENCE.md section 7", "DKD top-1": "76.32"}
  return c
