"""Food-101 staged distillation: feature terms first, then the LSTM term, then the logits too.

The three phases of KAKAKA, "An innovative image classification scheme based on LSTM knowledge
distillation" (2025, in Chinese), scaled from its 20 / 50 epochs to the student's 20 (10 for
':mini'): feature terms only (attention transfer and FitNets with its learned regressor, student
stage4 against teacher stage3) for the first 20% of the epochs, the LSTM state-matching term
(student stage5 against teacher stage4) added until 50%, then every term (CE and KD too). The
feature terms need the teacher's features, so the teacher runs on every batch (student.teacher =
'online'). The regressor and the LSTM encoders train with the student and are not part of the
evaluated or exported student (docs/methods.md).

  python main.py --config=configs/food101_staged.py --workdir=runs/food101_staged
  python main.py --config=configs/food101_staged.py:mini --workdir=/tmp/staged_mini
"""
from jaxkd import config as schema

recipes = schema.sibling(__file__, "food101_recipes_common")


def get_config(arg=None):
  c = recipes.base(arg)
  c.name += " + staged feature -> LSTM -> logit distillation"
  c.student.teacher = "online"
  (s_hint, t_hint), (s_last, t_last) = recipes.HINT, recipes.LAST
  c.student.loss.feature_losses = (
      {"kind": "at", "student_key": s_hint, "teacher_key": t_hint, "weight": 1000.0},
      {"kind": "fitnet", "student_key": s_hint, "teacher_key": t_hint, "weight": 1.0},
      {"kind": "lstm", "student_key": s_last, "teacher_key": t_last, "weight": 0.1},
  )
  epochs = int(c.student.epochs)
  c.student.loss.phases = (f"features until {round(0.2 * epochs)}ep",
                           f"features+lstm until {round(0.5 * epochs)}ep", "all")
  return c
