"""Precomputed teacher logits, stored beside the data set and read back by key.

Offline distillation (Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network",
NIPS 2014 Deep Learning Workshop, arXiv:1503.02531, 2015) as the Food-101 distillation paper "A
Lightweight Food Image Classification Model Based on Knowledge Distillation and ECA Attention"
(in Chinese; it names no authors, venue or year) runs it: the teacher runs once over the
training images and the student reads the stored logits instead of running the teacher every
step. Beyer, Zhai, Royer, Markeeva, Anil and Kolesnikov ("Knowledge distillation: A good
teacher is patient and consistent", CVPR 2022) show that fixed logits are inconsistent with
random crops, so per-image logits are computed with *eval* preprocessing (recorded in the
manifest) and are the cheap baseline, not the strongest recipe. Region stores
(`jaxkd.data.regions`, folder `split_folder(split, preprocessing)`) hold the teacher's logits on R
stored training crops per image instead, replayed for the student.

One job per module:

* `layout`: folders, file names, the manifest format and its checksums (`store_path`,
  `partial_path`, `TeacherStoreError`, ...);
* `identity`: `teacher_id` / `params_sha256`, the teacher's identity;
* `writer`: the resumable '<split>.partial' folder and the atomic finish;
* `reader`: `TeacherStore.open` (validation) and NumPy access by key;
* `compute`: `precompute`, the driver that runs the teacher and writes a store.

Nothing here imports TensorFlow; the tf.data join of a store's logits (a lookup table and a
gather inside the input pipeline) is `jaxkd.data.teacher_logits.tf_lookup(store)`.
"""
from jaxkd.teacher_store.compute import precompute
from jaxkd.teacher_store.identity import params_sha256, teacher_id
from jaxkd.teacher_store.layout import (
  DEFAULT_HINT,
  EXPECTABLE_FIELDS,
  FORMAT,
  FORMAT_VERSION,
  KEYS_FILE,
  LOGITS_FILE,
  MANIFEST_FILE,
  PARTIAL_SUFFIX,
  PROGRESS_FILE,
  STORE_DTYPES,
  TeacherStoreError,
  partial_path,
  split_folder,
  store_path,
  stores_root,
)
from jaxkd.teacher_store.reader import TeacherStore
from jaxkd.teacher_store.writer import Batch, BatchSource

__all__ = [
    "DEFAULT_HINT", "EXPECTABLE_FIELDS", "FORMAT", "FORMAT_VERSION", "KEYS_FILE", "LOGITS_FILE",
    "MANIFEST_FILE", "PARTIAL_SUFFIX", "PROGRESS_FILE", "STORE_DTYPES", "Batch", "BatchSource",
    "TeacherStore", "TeacherStoreError", "params_sha256", "partial_path", "precompute",
    "split_folder", "store_path", "stores_root", "teacher_id",
]
