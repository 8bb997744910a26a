"""Only the teacher of the Food-101 pipeline: fine-tune ImageNet ResNet-50 on Food-101 for 3
epochs and evaluate.

  python main.py --config=configs/food101_teacher.py --workdir=runs/food101_teacher
"""
from jaxkd import config as schema

food101_eca = schema.sibling(__file__, "food101_eca")


def get_config():
  c = food101_eca.get_config()
  c.name = "Food-101: ResNet-50 teacher"
  c.student.enabled = False
  return c
