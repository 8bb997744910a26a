"""Food-101 KD from two teachers: the mean of their probabilities.

The student distils from p = (softmax(z_1 / T) + softmax(z_2 / T)) / 2: the teacher this run
trains (config.teacher, ResNet-50) and a second, finished teacher from another run, given as its
workdir in config.student.extra_teachers ('WORKDIR:student' takes that run's student instead).
Both teachers' logits are stored once, each in its own store. Make the second teacher first, for
example a ResNet-34 fine-tuned the same way:

  python main.py --config=configs/food101_teacher.py --workdir=runs/food101_teacher_resnet34 \
      --config.teacher.model=resnet34 --config.teacher.pretrained=torchvision:IMAGENET1K_V1
  python main.py --config=configs/food101_two_teachers.py --workdir=runs/food101_two_teachers

':mini' runs it on the small folder, with the second teacher from runs/food101_mini_teacher_b
(for example `python main.py --config=configs/food101_mini.py --workdir=runs/food101_mini_teacher_b
--config.student.enabled=False --config.seed=1`); --config.student.extra_teachers="('DIR',)"
points elsewhere.
"""
from jaxkd import config as schema

recipes = schema.sibling(__file__, "food101_recipes_common")


def get_config(arg=None):
  c = recipes.base(arg)
  c.name += " + two teachers (mean of their probabilities)"
  c.student.extra_teachers = (("runs/food101_mini_teacher_b",) if arg == "mini"
                              else ("runs/food101_teacher_resnet34",))
  return c
