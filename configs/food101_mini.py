"""The whole Food-101 pipeline on a small Food-101-layout folder, on a laptop CPU in minutes.

Defaults to ../shared/data/food-101-mini (10 classes, 2,000 train / 800 test JPEGs); point
--config.data.manual_dir at any folder in the Food-101 archive layout. Small resolution (96 px),
a ResNet-18 teacher trained from scratch, a MobileNetV3-Small student with ECA at the end of
every stage, distilled with KD from stored teacher logits; the student exported as float32 and
int8 TFLite.

  python main.py --config=configs/food101_mini.py --workdir=/tmp/food101_mini
"""
from jaxkd import config as schema


def get_config():
  c = schema.base_config()
  c.name = "food-101-mini: ResNet-18 -> MobileNetV3-Small + ECA, KD (the Food-101 recipe, small)"
  c.dtype = "auto"
  c.data.name = "food101_local"
  c.data.manual_dir = "../shared/data/food-101-mini"
  # 96 px, not 64: at 64 px ResNet-18's last stage is 2x2 and XLA:CPU turns its 3x3 convolutions
  # into a pathologically slow form (90% of the step); 96 px is 5x faster on CPU despite twice the
  # pixels.
  c.augment.image_size = 96
  c.augment.train_crop = "random_resized_crop"
  c.augment.rrc_scale = (0.25, 1.0)
  c.augment.color_jitter = (0.2, 0.2, 0.2, 0.05)

  c.teacher.model = "resnet18"
  c.teacher.epochs = 10
  c.teacher.batch_size = 64
  c.teacher.optimizer = schema.optimizer("adam", learning_rate=2e-3, weight_decay=1e-4,
                                         schedule="one_cycle")
  c.teacher.checkpoint_every_steps = 25
  c.teacher.log_every_steps = 10

  c.student.model = "mobilenet_v3_small"
  # PyTorch-default BN momentum: torchvision's 0.01 leaves stale eval statistics after a few
  # hundred steps.
  c.student.model_kwargs.stage_attention = "eca"
  c.student.model_kwargs.bn_momentum = 0.9
  c.student.epochs = 10
  c.student.batch_size = 64
  c.student.teacher = "stored"
  c.student.optimizer = schema.optimizer("adam", learning_rate=2e-3, weight_decay=1e-4,
                                         schedule="one_cycle")
  c.student.loss = schema.loss("kd", temperature=4.0)
  c.student.loss.kd_alpha = 0.5
  c.student.checkpoint_every_steps = 25
  c.student.log_every_steps = 10

  c.teacher_logits.batch_size = 64
  c.evaluate.batch_size = 64

  # Deployable files of the student: float32 and int8 TFLite in <workdir>/export/, verified on
  # val (needs `pip install -e ".[export]"`; --config.export.formats="()" turns the stage off).
  c.export.formats = ("tflite", "tflite:int8")
  return c
