"""`python -m jaxkd.predict`: top-k classes of image files, equal to jaxkd's evaluation forward.

The reference is the experiment's own evaluation path (``pipeline.eval_batches`` of the val
split + ``make_eval_step``) on the same files, for the trained student of tests/test_export.py
(one finished run's workdir per session).
"""
import json
import pathlib

import numpy as np
import pytest
import test_export


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  from conftest import SHARED_DATA, shared_data_available
  return test_export.trained_run(tmp_path_factory.mktemp("export_run"),
                                 SHARED_DATA if shared_data_available() else None)


def _eval_forward(run, n):
  """(file paths, softmax probabilities) of the first `n` val examples by jaxkd's eval step."""
  import jax

  from jaxkd.data import augment, pipeline
  from jaxkd.train.step import data_mesh, make_eval_step
  mesh = data_mesh()
  batch = next(pipeline.eval_batches(run["source"], "val", global_batch_size=8, mesh=mesh,
                                     augment=augment.AugmentConfig(image_size=test_export.SIZE)))
  out = make_eval_step(run["model"], mesh)(run["variables"], batch)
  probs = np.asarray(jax.nn.softmax(np.asarray(out["logits"], np.float64), axis=-1))[:n]
  keys = [k.decode() for k in batch["key"][:n]]
  train = pathlib.Path(run["folder"]) / "train"
  paths = [next(train.glob(f"{k}.*")) for k in keys]
  return paths, probs


def test_predict_equals_eval_forward(run, capsys):
  from jaxkd.predict import main
  paths, want = _eval_forward(run, 3)
  assert main([str(run["workdir"]), *map(str, paths), "--top_k=3", "--json"]) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  names = list(run["source"].class_names)
  assert [line["path"] for line in lines] == [str(p) for p in paths]
  for line, p in zip(lines, want):
    best = np.argsort(-p, kind="stable")[:3]
    assert [name for name, _ in line["top_k"]] == [names[i] for i in best]
    np.testing.assert_allclose([prob for _, prob in line["top_k"]], p[best], atol=1e-6)


def test_bad_image_is_reported_and_others_go_on(run, tmp_path, capsys):
  from jaxkd.predict import main
  paths, want = _eval_forward(run, 2)
  folder = tmp_path / "imgs"
  folder.mkdir()
  for i, p in enumerate(paths):
    (folder / f"{i}{p.suffix}").write_bytes(p.read_bytes())
  (folder / "broken.jpg").write_bytes(b"not an image")
  assert main([str(run["workdir"]), str(folder), "--json", "--top_k=1"]) == 1
  captured = capsys.readouterr()
  lines = {pathlib.Path(r["path"]).stem: r for r in map(json.loads, captured.out.splitlines())}
  assert set(lines) == {"0", "1", "broken"}
  assert "cannot decode" in lines["broken"]["error"] and "broken.jpg" in captured.err
  names = list(run["source"].class_names)
  for i, p in enumerate(want):
    assert lines[str(i)]["top_k"][0][0] == names[int(np.argmax(p))]


def test_predict_plain_text_and_missing_path(run, tmp_path, capsys):
  from jaxkd.predict import main
  paths, _ = _eval_forward(run, 1)
  assert main([str(run["workdir"]), str(paths[0]), "--top_k=2"]) == 0
  out = capsys.readouterr().out.strip()
  assert out.startswith(f"{paths[0]}: ") and out.count(",") == 1
  assert main([str(run["workdir"]), str(tmp_path / "missing.jpg")]) == 2
  assert "missing.jpg" in capsys.readouterr().err


def test_class_names_come_from_dataset_json_else_from_the_data(run, tmp_path, monkeypatch,
                                                               capsys):
  """A workdir records its class names: predict needs no data folder; an older dataset.json
  without them falls back to opening the run's data."""
  import shutil

  from jaxkd.export import deploy
  from jaxkd.predict import main
  names = list(run["source"].class_names)
  wd = tmp_path / "run"
  shutil.copytree(run["workdir"], wd)
  dataset = json.loads((wd / "dataset.json").read_text())
  assert dataset["class_names"] == names
  image = str(_eval_forward(run, 1)[0][0])
  opened = []

  def no_data(config):
    opened.append(config.data.manual_dir)
    raise FileNotFoundError(f"{config.data.manual_dir}: the data folder is gone")

  monkeypatch.setattr(deploy, "data_source", no_data)
  assert main([str(wd), image, "--json", "--top_k=1"]) == 0
  assert json.loads(capsys.readouterr().out)["top_k"][0][0] in names and opened == []
  del dataset["class_names"]
  (wd / "dataset.json").write_text(json.dumps(dataset))
  monkeypatch.undo()
  assert main([str(wd), image, "--json", "--top_k=1"]) == 0
  assert json.loads(capsys.readouterr().out)["top_k"][0][0] in names


def test_an_old_dataset_json_without_class_names_is_accepted_and_completed(run, tmp_path):
  from jaxkd.config import ConfigError
  from jaxkd.workdir import Workdir
  source = run["source"]
  wd = Workdir(tmp_path / "old")
  old = {"name": source.name, "version": source.version, "num_classes": source.num_classes,
         "num_examples": {s: source.num_examples(s) for s in ("train", "val", "test")}}
  (wd.path / "dataset.json").write_text(json.dumps(old))
  wd.check_dataset(source)
  saved = json.loads((wd.path / "dataset.json").read_text())
  assert saved == {**old, "class_names": list(source.class_names)}
  saved["class_names"] = saved["class_names"][::-1]  # other classes under the same counts
  (wd.path / "dataset.json").write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match="class_names"):
    wd.check_dataset(source)
