"""The base of the Food-101 distillation recipes, full size or mini: configs/food101_progressive.py,
food101_temperature_decay.py, food101_accuracy_temperature.py, food101_staged.py and
food101_two_teachers.py.

`base(arg)`: with arg None, the Food-101 job of configs/food101_eca.py (ResNet-50 teacher
fine-tuned, MobileNetV3-Large + ECA student, 20 epochs, KD with a = 0.5, T = 4, stored logits);
with arg 'mini', the same recipe on configs/food101_mini.py's small folder and models (ResNet-18
-> MobileNetV3-Small + ECA, 96 px, 10 + 10 epochs), which runs on a laptop CPU in minutes. Each
recipe then changes the student's loss only, so the recipes compare with each other and with the
plain KD job at the same size.
"""
from jaxkd import config as schema

food101_eca = schema.sibling(__file__, "food101_eca")
food101_mini = schema.sibling(__file__, "food101_mini")

SIZES = ("full", "mini")


def base(arg: str | None):
  size = arg or "full"
  if size not in SIZES:
    raise schema.ConfigError(f"config argument {arg!r}: use ':mini' for the small version (on "
                             "../shared/data/food-101-mini or --config.data.manual_dir), or "
                             "nothing for Food-101")
  c = food101_mini.get_config() if size == "mini" else food101_eca.get_config()
  c.report.reference = {}  # the paper's numbers are for plain KD
  return c


# Student / teacher feature maps of the same spatial size, in both sizes: MobileNetV3 stage4 and
# ResNet stage3 (14x14 at 224 px, 6x6 at 96 px) for attention transfer and FitNets; the last
# stages (7x7 / 3x3) for the LSTM term.
HINT = ("stage4", "stage3")
LAST = ("stage5", "stage4")
