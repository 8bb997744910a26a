"""Food-101 KD with a decaying temperature: T from 10 to 1, linearly over the student's steps.

The temperature-decay schedule of the 2025 article "Implementing knowledge distillation in image
classification: from principles to diagrams" (in Chinese): soft targets early, sharp ones late.
Otherwise the job of configs/food101_eca.py (a = 0.5); ':mini' runs it on the small folder.

  python main.py --config=configs/food101_temperature_decay.py --workdir=runs/food101_tdecay
  python main.py --config=configs/food101_temperature_decay.py:mini --workdir=/tmp/tdecay_mini
"""
from jaxkd import config as schema

recipes = schema.sibling(__file__, "food101_recipes_common")


def get_config(arg=None):
  c = recipes.base(arg)
  c.name += " + temperature decay (10 -> 1)"
  c.student.loss.temperature = "linear(10, 1)"
  return c
