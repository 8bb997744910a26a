"""Food-101: ResNet-50 teacher fine-tuned, logits stored, MobileNetV3-Large + ECA student with KD.

Teacher: ImageNet ResNet-50 (torchvision weights, imported) fine-tuned 3 epochs.
Student: MobileNetV3-Large with an ECA module (Wang et al., "ECA-Net", CVPR 2020) at the end of
every stage, 20 epochs,
L = (1 - a) CE + a T^2 KL (a = 0.5, T = 4), Adam (weight decay 1e-4) + one-cycle,
batch 32, mixed precision (bfloat16 on GPU/TPU); the student exported as float32 and int8
TFLite (<workdir>/export/). Data: TFDS food101, 80/20 split of
the official training images into train/val, official test as test; images
resized to a longest side of 512, random crop, flip, colour jitter.

  python main.py --config=configs/food101_eca.py --workdir=runs/food101_eca
  (or --config.teacher.pretrained=~/weights/resnet50.safetensors for a local checkpoint)

With the archive already extracted: --config.data.name=food101_local --config.data.manual_dir=~/data
"""
from jaxkd import config as schema


def get_config():
  c = schema.base_config()
  c.name = "Food-101: ResNet-50 -> MobileNetV3-Large + ECA, KD"
  c.data.name = "food101"
  c.augment.image_size = 224
  c.augment.train_crop = "resize_random_crop"
  c.augment.resize_longest = 512
  c.augment.color_jitter = (0.2, 0.2, 0.2, 0.05)

  c.teacher.model = "resnet50"
  # torchvision's ImageNet weights, downloaded to ~/.cache/jaxkd (a .pth, read without torch; or
  # give a local .safetensors / .pth path).
  c.teacher.pretrained = "torchvision:IMAGENET1K_V1"
  c.teacher.epochs = 3
  c.teacher.batch_size = 32
  c.teacher.optimizer = schema.optimizer("adam", learning_rate=3e-4, weight_decay=1e-4,
                                         schedule="one_cycle")
  c.teacher.loss = schema.loss("ce")

  c.student.model = "mobilenet_v3_large_eca"
  c.student.epochs = 20
  c.student.batch_size = 32
  c.student.teacher = "stored"
  c.student.optimizer = schema.optimizer("adam", learning_rate=1e-3, weight_decay=1e-4,
                                         schedule="one_cycle")
  c.student.loss = schema.loss("kd", temperature=4.0)
  c.student.loss.kd_alpha = 0.5

  # The main job ends with deployable files of the student (<workdir>/export/, the report's
  # deployment table): float32 and int8 TFLite. Needs `pip install -e ".[export]"`;
  # --config.export.formats="()" turns the stage off.
  c.export.formats = ("tflite", "tflite:int8")

  # Shown in the report only when the run is this one (dataset, classes, models, loss).
  c.report.reference = {
      "source": "the Food-101 KD + ECA paper (lightweight food classification with knowledge "
                "distillation and ECA attention; docs/methods.md)",
      "teacher val top-1": "76.76%", "student (MobileNetV3-L + ECA, KD) top-1": "78.50%",
      "MobileNetV3 baseline": "about 74%",
      "applies_to": {"dataset": ["food101", "food101_local"], "num_classes": 101,
                     "teacher": "resnet50", "student": "mobilenet_v3_large_eca", "loss": "kd"}}
  return c
