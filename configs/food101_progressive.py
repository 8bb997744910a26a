"""Food-101 KD with progressive transfer: temperature and KD weight in three phases.

T = 8 and a = 0.9 for the first 50% of the student's steps, then linearly to T = 2 and a = 0.7
over the next 30%, then T = 1 and a = 0.5 (L = (1 - a) CE + a KD; the 2025 article
"Implementing knowledge distillation in image classification: from principles to diagrams", in
Chinese). Otherwise the job of configs/food101_eca.py; ':mini' runs it on the small folder.

  python main.py --config=configs/food101_progressive.py --workdir=runs/food101_progressive
  python main.py --config=configs/food101_progressive.py:mini --workdir=/tmp/progressive_mini
"""
from jaxkd import config as schema

recipes = schema.sibling(__file__, "food101_recipes_common")


def get_config(arg=None):
  c = recipes.base(arg)
  c.name += " + progressive transfer (T, a in three phases)"
  c.student.loss.temperature = "progressive"
  c.student.loss.kd_alpha = "progressive"
  return c
