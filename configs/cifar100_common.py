"""The CIFAR-100 recipe of the DKD papers (mdistiller's hyper-parameters).

240 epochs, SGD momentum 0.9, weight decay 5e-4, batch 64, lr 0.05 (0.01 for MobileNet/ShuffleNet
students), x0.1 at epochs 150, 180, 210; random crop with 4-pixel padding + flip. The teacher is
trained here with the same recipe (mdistiller ships pretrained teachers; import is not supported
for the CIFAR models yet), then the student learns from the online teacher on the same
augmented batch, as mdistiller does.
"""
from jaxkd import config as schema


def recipe(teacher: str, student: str, *, student_lr: float = 0.05):
  c = schema.base_config()
  c.data.name = "cifar100"
  c.augment.image_size = 32
  c.augment.train_crop = "pad_random_crop"
  c.augment.eval_crop_fraction = 1.0
  sgd = dict(weight_decay=5e-4, momentum=0.9, schedule="multistep", milestones=(150, 180, 210),
             lr_decay=0.1)
  c.teacher.model = teacher
  c.teacher.epochs = 240
  c.teacher.batch_size = 64
  c.teacher.optimizer = schema.optimizer("sgd", learning_rate=0.05, **sgd)
  c.teacher.loss = schema.loss("ce")
  c.student.model = student
  c.student.epochs = 240
  c.student.batch_size = 64
  c.student.teacher = "online"
  c.student.optimizer = schema.optimizer("sgd", learning_rate=student_lr, **sgd)
  c.evaluate.splits = ("val", "test")
  c.evaluate.batch_size = 128
  return c
