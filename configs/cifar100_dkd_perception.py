"""CIFAR-100 resnet32x4 -> resnet8x4 with DKD + perception reconstruction of the logits.
Published: 76.90."""
from jaxkd import config as schema

cifar100_dkd = schema.sibling(__file__, "cifar100_dkd")


def get_config():
  c = cifar100_dkd.get_config()
  c.name = "CIFAR-100: resnet32x4 -> resnet8x4, DKD + perception reconstruction"
  c.student.loss.perception = True
  c.report.reference = {
      "source": "Zhu and Zhu, Decoupled knowledge distillation based on perception "
                "reconstruction, Computer Systems & Applications 34(2), 2025",
      "DKD + perception top-1": "76.90",
      "applies_to": {"dataset": "cifar100", "teacher": "resnet32x4", "student": "resnet8x4",
                     "loss": "dkd", "perception": True}}
  return c
