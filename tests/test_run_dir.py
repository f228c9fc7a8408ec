"""`simvlm_jax.run_dir`: the vocabulary travels with the run, and one function opens a run."""
import json
import os
import shutil

import gin
import jax
import numpy as np
import pytest
import seqio

from conftest import SENTENCES, write_run
from simvlm_jax import run_dir
from simvlm_jax.data import vocab
from simvlm_jax.errors import UserError


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("spm"))
  first = vocab.train_sentencepiece(SENTENCES, 300, "a", directory=directory)
  second = vocab.train_sentencepiece(SENTENCES[::-1] + ["another corpus"], 300, "b",
                                     directory=directory)
  return first, second


def test_a_run_carries_its_vocabulary_and_opens_anywhere(spm_models, tmp_path, tiny_config,
                                                          monkeypatch):
  original = tmp_path / "my.model"
  shutil.copy(spm_models[0], original)
  model_dir, params = write_run(tmp_path, tiny_config, str(original), vocab_size=320)
  assert (model_dir / "vocabulary.model").read_bytes() == original.read_bytes()
  assert json.loads((model_dir / "vocabulary.json").read_text()) == {
      "extra_ids": 0, "size": 300, "source": str(original)}
  assert (f"sentencepiece_vocabulary.model_path = '{model_dir}/vocabulary.model'"
          in (model_dir / "config.gin").read_text())

  # Moved elsewhere and opened by a relative path, through a step directory: the copy beside it
  # is what is read, and the step is that directory's.
  moved = tmp_path / "elsewhere"
  os.rename(model_dir, moved)
  original.unlink()  # the original is gone too
  monkeypatch.chdir(tmp_path)
  run = run_dir.open_run("elsewhere/checkpoints/7")
  assert run.directory == moved and run.step == 7 and run.answers is None
  assert gin.query_parameter("sentencepiece_vocabulary.model_path") == str(
      moved / "vocabulary.model")
  # 300 ids in a 320-row embedding (padded rows, as t5x): allowed; decoding skips the padding ids.
  assert run.vocabulary.vocab_size == 300 and run.config.vocab_size == 320
  ids = run.vocabulary.encode("a red circle")
  assert run.decode(ids + [310, 1, 5]) == "a red circle"
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.params), params)
  gin.clear_config()


def test_vocabulary_mismatches_are_caught_before_training(spm_models, tmp_path, tiny_config):
  vocabulary = seqio.SentencePieceVocabulary(spm_models[0])
  run_dir.check_vocabulary(vocabulary, tiny_config(vocab_size=300))
  with pytest.raises(UserError, match=r"^the vocabulary has 300 ids but the model embeds only "
                     r"299 \(ModelConfig.vocab_size\): set VOCAB_SIZE to at least 300"):
    run_dir.check_vocabulary(vocabulary, tiny_config(vocab_size=299))
  model_dir, _ = write_run(tmp_path, tiny_config, spm_models[0])
  run_dir.write_vocabulary(str(model_dir), vocabulary)  # a resumed run, same vocabulary: fine
  with pytest.raises(UserError, match="a run cannot change its vocabulary"):
    run_dir.write_vocabulary(str(model_dir), seqio.SentencePieceVocabulary(spm_models[1]))
  # Finetuning from the run with data tokenized another way.
  with pytest.raises(UserError, match="was trained with another vocabulary"):
    run_dir.check_same_vocabulary(str(model_dir), seqio.SentencePieceVocabulary(spm_models[1]))
  run_dir.check_same_vocabulary(str(model_dir), vocabulary)


def test_finetuning_inherits_the_vocabulary_unless_one_is_bound(spm_models, tmp_path,
                                                                 tiny_config):
  model_dir, _ = write_run(tmp_path, tiny_config, spm_models[0])
  gin.clear_config()
  assert run_dir.inherit_vocabulary(str(model_dir / "checkpoints" / "7")) == str(
      model_dir / "vocabulary.model")
  assert vocab.sentencepiece_vocabulary() == (str(model_dir / "vocabulary.model"), 0)
  gin.clear_config()
  gin.bind_parameter("sentencepiece_vocabulary.model_path", spm_models[1])
  assert run_dir.inherit_vocabulary(str(model_dir)) is None
  assert vocab.sentencepiece_vocabulary() == (spm_models[1], 0)
  gin.clear_config()
  assert run_dir.inherit_vocabulary(str(tmp_path / "not_a_run")) is None


def test_a_run_without_vocabulary_cannot_decode(tmp_path, tiny_config):
  model_dir = tmp_path / "synthetic"
  model_dir.mkdir()
  (model_dir / "config.gin").write_text("ModelConfig.vocab_size = 64\n")
  with pytest.raises(UserError, match="holds no vocabulary.model: it was trained on synthetic"):
    run_dir.open_run(str(model_dir), restore=False)
  run = run_dir.open_run(str(model_dir), restore=False, need_vocabulary=False)
  assert run.vocabulary is None and run.config.vocab_size == 64
  with pytest.raises(UserError, match="no checkpoint in"):
    run.restore()
  gin.clear_config()


def test_the_library_never_imports_tasks():
  """No module of `simvlm_jax` imports the task zoo (`tasks/`): a reader of a run (predict,
  export, eval of a task the user imports) needs none of it."""
  import ast  # pylint: disable=import-outside-toplevel
  library = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "simvlm_jax")
  offenders = []
  for root, _, files in os.walk(library):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      for node in ast.walk(ast.parse(open(path).read())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(n == "tasks" or n.startswith("tasks.") for n in names):
          offenders.append(f"{os.path.relpath(path, library)}:{node.lineno}")
  assert offenders == []


def test_opening_a_run_does_not_import_its_task_modules(spm_models, tmp_path, tiny_config):
  """A finetuning run's config.gin imports `tasks` and binds its configurables (as train writes
  it): predict's `open_run` reads the model and the run's settings without importing any of it."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  model_dir, _ = write_run(tmp_path, tiny_config, spm_models[0])
  gin.clear_config()
  config = (model_dir / "config.gin").read_text()
  (model_dir / "config.gin").write_text(
      "import tasks\nimport simvlm_jax.data.finetune\n" + config +
      "make_finetune_iterator.task_name = 'shapes_nlvr2'\n"
      "tasks.register_downstream.variant = 'shapes'\n")
  script = ("import sys\nfrom simvlm_jax import predict\n"
            f"p = predict.Predictor({str(model_dir)!r}, restore=False)\n"
            "print(p.benchmark, p.pairs, 'tasks' in sys.modules)\n")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["nlvr2", "True", "False"]
