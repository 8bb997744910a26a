"""Food-101 KD with an accuracy-driven temperature: T set from the student's val top-1.

After every validation T becomes 1 below 70% val top-1, 3 below 90%, 5 from 90% up (KAKAKA, "An
innovative image classification scheme based on LSTM knowledge distillation", 2025, in Chinese);
T = 1 until the first validation. The value in use is saved with every checkpoint, so a resumed
run continues with it. Otherwise the job of configs/food101_eca.py (a = 0.5); ':mini' runs it on
the small folder.

  python main.py --config=configs/food101_accuracy_temperature.py --workdir=runs/food101_acc_t
  python main.py --config=configs/food101_accuracy_temperature.py:mini --workdir=/tmp/acc_t_mini
"""
from jaxkd import config as schema

recipes = schema.sibling(__file__, "food101_recipes_common")


def get_config(arg=None):
  c = recipes.base(arg)
  c.name += " + accuracy-driven temperature"
  c.student.loss.temperature = "from_accuracy"
  return c
