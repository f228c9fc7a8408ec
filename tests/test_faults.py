"""Faults a long run meets, in process: divergence, damaged checkpoints, another model's checkpoint,
a checkpoint of another number of processes, and the mistakes a user makes (each a UserError with
one line that says what to change). The command-line side (one `error:` line, exit status 2) and
the signals are in tests/test_fault_commands.py."""
import gc
import json
import logging
import os
import shutil
import signal
import sys
import warnings

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tasks  # noqa: F401  (registers the shapes tasks the user-error cases name)
from simvlm_jax import (checkpoint_faults, checkpoints, decoding, gin_utils, nonfinite, preemption, pretrained, train,
                        trainer)
from simvlm_jax.data import pipeline, prefetch
from simvlm_jax.data.synthetic import SyntheticIterator
from simvlm_jax.errors import CheckpointError, DivergenceError, UserError, one_line
from simvlm_jax.partitioning import Partitioner, resolve_mesh_shape

ONE_DEVICE = jax.devices()[:1]
CLASSES = 5


class ClassifierBatches:
  """VQA-classifier batches (float soft scores, so a NaN can ride in the data); the rows of the
  steps in `nan_at` (0-based positions) carry a NaN score. Follows the data iterator protocol."""

  def __init__(self, image_size: int, vocab_size: int, nan_at=(), shard_index=0, num_shards=1):
    del shard_index, num_shards
    self.image_size, self.vocab_size, self.nan_at = image_size, vocab_size, set(nan_at)
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng(self.position)
    scores = rng.uniform(0, 1, (4, CLASSES)).astype(np.float32)
    if self.position in self.nan_at:
      scores[0, 0] = np.nan
    self.position += 1
    return {"image_text": {
        "images": rng.integers(0, 255, (4, self.image_size, self.image_size, 3), np.uint8),
        "prefix_tokens": rng.integers(2, self.vocab_size, (4, 6)).astype(np.int32),
        "class_scores": scores}}

  def save(self, path):
    with open(path + ".json", "w") as f:
      json.dump({"position": self.position}, f)

  def restore(self, path):
    with open(path + ".json") as f:
      self.position = json.load(f)["position"]

  def counters(self):
    return {}


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


# --- divergence -----------------------------------------------------------------------------------

def test_nonfinite_step_changes_nothing_but_the_step(tiny_config):
  """A batch that makes the loss NaN: parameters and optimizer state stay bitwise as they were, the
  step advances, the metrics say what was not finite; the next good batch updates as usual."""
  config = tiny_config(num_classes=CLASSES)
  part = Partitioner((1, 1, 1), devices=ONE_DEVICE)
  tr = trainer.Trainer(config, part, total_steps=10)
  data = ClassifierBatches(config.image_size, config.vocab_size, nan_at=(1,))
  state, _ = tr.train_step(tr.init_state(), part.shard_batch(next(data)))
  before = _leaves((state.params, state.opt_state))
  state, metrics = tr.train_step(state, part.shard_batch(next(data)))
  assert int(state.step) == 2
  assert int(metrics["nonfinite_loss"]) == 1 and int(metrics["nonfinite_grad"]) == 1
  for a, b in zip(before, _leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(a, b)
  state, metrics = tr.train_step(state, part.shard_batch(next(data)))
  assert int(metrics["nonfinite_loss"]) == 0 and int(metrics["nonfinite_grad"]) == 0
  assert not all(np.array_equal(a, b) for a, b in zip(before, _leaves(state.params)))


def _train_classifier(tiny_config, model_dir, nan_at, keep_gin=False, **kwargs):
  config = tiny_config(num_classes=CLASSES)
  if not keep_gin:
    gin.clear_config()
  return train.train(
      model_dir=str(model_dir), total_steps=kwargs.pop("total_steps", 8),
      train_iterator_fn=lambda **kw: ClassifierBatches(config.image_size, config.vocab_size,
                                                       nan_at, **kw),
      model_config=config, partitioner=Partitioner((1, 1, 1), devices=ONE_DEVICE),
      log_every=1, checkpoint_every=2, keep_checkpoints=None, **kwargs)


def _all_checkpoints_finite(model_dir):
  directory = os.path.join(model_dir, "checkpoints")
  steps = ocp.path.step.checkpoint_steps(directory)
  for step in steps:
    tree = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "state"))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.floating)), step
  return sorted(steps)


def test_skip_policy_skips_one_bad_step_and_goes_on(tiny_config, tmp_path, capsys):
  state = _train_classifier(tiny_config, tmp_path, nan_at=(3,), max_consecutive_nonfinite=2)
  assert int(state.step) == 8
  out = capsys.readouterr().out
  assert ("step 4: the loss (nan) and the gradient norm (nan) are not finite: update skipped "
          "(1 in a row, 1 in all)") in out
  assert out.count("update skipped") == 1
  assert _all_checkpoints_finite(str(tmp_path)) == [2, 4, 6, 8]


def test_skip_policy_stops_after_consecutive_bad_steps(tiny_config, tmp_path, capsys):
  with pytest.raises(DivergenceError) as error:
    _train_classifier(tiny_config, tmp_path, nan_at=(3, 4, 5), max_consecutive_nonfinite=2)
  # Step 4's checkpoint was written before its flags were read (one step behind); it is not
  # named as good. While bad steps follow each other nothing more is written.
  assert one_line(error.value) == (
      "training diverged: steps 4-5: 2 updates in a row had a non-finite loss or gradient norm "
      f"and were skipped (train.max_consecutive_nonfinite). The last good checkpoint is step 2 "
      f"({tmp_path}/checkpoints/2); lower the learning rate or check the data, then resume "
      "from it")
  assert "(2 in a row, 2 in all)" in capsys.readouterr().out
  assert _all_checkpoints_finite(str(tmp_path)) == [2, 4]


def test_halt_policy_stops_at_the_first_bad_step(tiny_config, tmp_path):
  with pytest.raises(DivergenceError, match=r"^training diverged: step 4: the loss \(nan\) and "
                     r"the gradient norm \(nan\) are not finite \(train.nonfinite_policy='halt'\)"
                     r".*The last good checkpoint is step 2 "):
    _train_classifier(tiny_config, tmp_path, nan_at=(3,), nonfinite_policy="halt")


def test_a_nonfinite_state_is_never_saved(tiny_config, tmp_path):
  tr = trainer.Trainer(tiny_config(), Partitioner((1, 1, 1), devices=ONE_DEVICE), total_steps=4)
  state = tr.init_state()
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1)
  ckpt.save(state, step=1)
  ckpt.wait()
  params = jax.tree.map(lambda x: x, state.params)
  params["token_embed"]["embedding"] = params["token_embed"]["embedding"].at[0, 0].set(np.inf)
  bad = state.replace(params=params)
  with pytest.raises(DivergenceError, match=f"step 2: the train state holds NaN or Inf values, so "
                     f"it was not saved; the last good checkpoint is step 1 \\({tmp_path}/1\\)"):
    ckpt.save(bad, step=2)
  ckpt.close()
  assert ocp.path.step.checkpoint_steps(str(tmp_path)) == [1]


def test_nonfinite_policy_is_checked():
  ckpt = None
  with pytest.raises(UserError, match="nonfinite_policy must be 'skip' or 'halt'"):
    nonfinite.NonFiniteGuard("ignore", 3, ckpt, print)
  with pytest.raises(UserError, match="max_consecutive_nonfinite must be >= 1"):
    nonfinite.NonFiniteGuard("skip", 0, ckpt, print)


# --- damaged checkpoints --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_config):
  """A run with checkpoints 2 and 4 (state and iterator position), copied by each test."""
  directory = tmp_path_factory.mktemp("run")
  config = tiny_config()
  gin.clear_config()
  train.train(model_dir=str(directory), total_steps=4,
              train_iterator_fn=lambda **kw: SyntheticIterator(
                  image_size=config.image_size, vocab_size=config.vocab_size, text_batch=4, **kw),
              model_config=config, partitioner=Partitioner((1, 1, 1), devices=ONE_DEVICE),
              log_every=2, checkpoint_every=2, keep_checkpoints=None)
  return directory, config


@pytest.fixture
def damaged(run_dir, tmp_path):
  """(copy of the run, its Trainer); each test damages step 4 its own way."""
  source, config = run_dir
  target = tmp_path / "run"
  shutil.copytree(source, target)
  return target, trainer.Trainer(config, Partitioner((1, 1, 1), devices=ONE_DEVICE), 4)


def _largest_file(directory):
  files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


def _cut(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
    "array file cut in half": lambda step: _cut(_largest_file(step / "state")),
    "array files deleted": lambda step: shutil.rmtree(step / "state" / "ocdbt.process_0"),
    "tree metadata deleted": lambda step: os.remove(step / "state" / "_METADATA"),
    "iterator position deleted": lambda step: os.remove(step / "data" / "process_0.json"),
    "iterator position emptied": lambda step: open(step / "data" / "process_0.json", "w").close(),
    # What the device prefetcher held (read, not yet trained on) when the checkpoint was saved.
    "held batches cut in half": lambda step: _cut(step / "data" / "process_0.pending.npz"),
}
# How the log line names each damage (reading the files again fails the same way).
DAMAGE_KIND = {"array file cut in half": "corrupt", "array files deleted": "corrupt",
               "tree metadata deleted": "corrupt", "iterator position deleted": "missing file",
               "iterator position emptied": "corrupt", "held batches cut in half": "corrupt"}
NO_WAIT = checkpoint_faults.Retries(tries=3, delay_s=0)


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_restart_skips_and_sets_aside_an_unreadable_checkpoint(damaged, how):
  run, tr = damaged
  DAMAGE[how](run / "checkpoints" / "4")
  ckpt = checkpoints.Checkpointer(str(run / "checkpoints"), retries=NO_WAIT)
  stream = lambda: SyntheticIterator(image_size=tr.config.image_size,  # noqa: E731  (the run's)
                                     vocab_size=tr.config.vocab_size, text_batch=4)
  lines, data = [], prefetch.DevicePrefetcher(stream(), lambda batch: batch, depth=0)
  state = ckpt.restore_newest_readable(tr.abstract_state, data, log=lines.append)
  # The loop's position: the next batch is the third (the prefetcher's held ones come first).
  fresh = stream()
  third = [next(fresh) for _ in range(3)][-1]
  assert int(state.step) == 2
  jax.tree.map(np.testing.assert_array_equal, next(data)[0], third)
  # Read twice (the damage reproduces), then set aside.
  assert len(lines) == 3, "\n".join(lines)
  assert lines[0].startswith(f"checkpoint 4 in {run}/checkpoints: reading failed (")
  assert lines[0].endswith("); trying again in 0s (try 2 of 3)")
  assert lines[1].startswith(f"checkpoint 4 in {run}/checkpoints cannot be read "
                             f"({DAMAGE_KIND[how]}: ")
  assert lines[1].endswith("); trying the one before it")
  assert lines[2] == f"checkpoint 4 set aside as {run}/checkpoints_unreadable/4"
  assert ckpt.all_steps() == [2]
  assert os.path.isdir(run / "checkpoints_unreadable" / "4" / "state")  # moved, not deleted
  ckpt.close()


def _flaky(monkeypatch, owner, name, fails, error=OSError("503 Service Unavailable")):
  """Makes `owner.name` raise `error` on its first `fails` calls (None: always); returns the
  list of calls' first arguments after self (the step, or the path read)."""
  real, calls = getattr(owner, name), []

  def flaky(*args, **kwargs):
    calls.append(args[1] if len(args) > 1 else args[0])
    if fails is None or len(calls) <= fails:
      raise error
    return real(*args, **kwargs)
  monkeypatch.setattr(owner, name, flaky)
  return calls


def test_a_read_error_that_passes_sets_nothing_aside(damaged, monkeypatch):
  """A GCS 503 at restart: the newest checkpoint is read again (after a pause) and resumed from;
  before, it was set aside and the run rolled back to the one before it."""
  run, tr = damaged
  calls = _flaky(monkeypatch, ocp.CheckpointManager, "restore", fails=1)
  ckpt = checkpoints.Checkpointer(str(run / "checkpoints"))  # the default retries: a 1 s pause
  lines = []
  state = ckpt.restore_newest_readable(tr.abstract_state, SyntheticIterator(), log=lines.append)
  assert int(state.step) == 4 and calls == [4, 4]
  assert lines == [f"checkpoint 4 in {run}/checkpoints: reading failed (503 Service "
                   "Unavailable); trying again in 1s (try 2 of 4)"]
  assert ckpt.all_steps() == [2, 4] and not os.path.exists(run / "checkpoints_unreadable")
  ckpt.close()


def test_a_read_error_that_persists_sets_the_checkpoint_aside(damaged, monkeypatch):
  run, tr = damaged
  real = ocp.CheckpointManager.restore

  def unavailable(self, step, *args, **kwargs):
    if step == 4:
      raise OSError("503 Service Unavailable")
    return real(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "restore", unavailable)
  ckpt = checkpoints.Checkpointer(str(run / "checkpoints"), retries=NO_WAIT)
  lines = []
  state = ckpt.restore_newest_readable(tr.abstract_state, SyntheticIterator(), log=lines.append)
  assert int(state.step) == 2
  assert lines[2:] == [f"checkpoint 4 in {run}/checkpoints cannot be read (failed 3 times: 503 "
                       "Service Unavailable); trying the one before it",
                       f"checkpoint 4 set aside as {run}/checkpoints_unreadable/4"]
  ckpt.close()


def test_eval_and_predict_read_again_after_an_error_that_passes(damaged, monkeypatch):
  """`restore_params` (eval, predict, export) retries too."""
  run, tr = damaged
  calls = _flaky(monkeypatch, checkpoints, "read_state_params", fails=1)
  ckpt = checkpoints.Checkpointer(str(run / "checkpoints"))
  params = ckpt.restore_params(tr.abstract_state.params)
  assert len(calls) == 2 and len(jax.tree.leaves(params)) > 10
  ckpt.close()
  calls = _flaky(monkeypatch, checkpoints, "read_state_params", fails=None)
  reader = checkpoints.CheckpointReader(str(run / "checkpoints"), retries=NO_WAIT)
  with pytest.raises(CheckpointError, match=r"^checkpoint 4 in .* cannot be read \(failed 3 "
                     r"times: 503 Service Unavailable\); the run has other checkpoints \[2\]"):
    reader.restore_params(tr.abstract_state.params)


def test_no_readable_checkpoint_renames_nothing(damaged):
  run, tr = damaged
  for step in ("2", "4"):
    _cut(_largest_file(run / "checkpoints" / step / "state"))
  ckpt = checkpoints.Checkpointer(str(run / "checkpoints"), retries=NO_WAIT)
  lines = []
  with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be read \(steps \[2, 4\]"):
    ckpt.restore_newest_readable(tr.abstract_state, SyntheticIterator(), log=lines.append)
  assert len(lines) == 4  # each: read again, then "cannot be read"
  assert sorted(ckpt.all_steps()) == [2, 4] and not os.path.exists(run / "checkpoints_unreadable")
  ckpt.close()


def test_checkpoint_of_another_model_is_an_error_not_damage(damaged, tiny_config):
  run, _ = damaged
  other = trainer.Trainer(tiny_config(emb_dim=48, num_heads=6),
                          Partitioner((1, 1, 1), devices=ONE_DEVICE), 4)
  ckpt = checkpoints.Checkpointer(str(run / "checkpoints"))
  with pytest.raises(CheckpointError, match=r"^checkpoint 4 in .*/run/checkpoints was written by another "
                     r"model: .* is \(.*32.*\) there, \(.*48.*\) here \(and \d+ more\)"):
    ckpt.restore_newest_readable(other.abstract_state, SyntheticIterator())
  with pytest.raises(CheckpointError, match="written by another model"):
    ckpt.restore_params(other.abstract_state.params)
  assert sorted(ckpt.all_steps()) == [2, 4]  # nothing set aside
  ckpt.close()


def test_checkpoint_of_another_number_of_processes(damaged):
  run, tr = damaged
  (run / "checkpoints" / "4" / "data" / checkpoints.PROCESSES_FILE).write_text(
      json.dumps({"processes": 2}))
  ckpt = checkpoints.Checkpointer(str(run / "checkpoints"))
  with pytest.raises(CheckpointError, match=r"checkpoint 4 in .* was written by 2 processes and "
                     r"this run has 1: the train state can be resumed .* "
                     r"--gin.train.resume_data_position=False"):
    ckpt.restore_newest_readable(tr.abstract_state, SyntheticIterator())
  # The switch: the state alone.
  state = ckpt.restore_newest_readable(tr.abstract_state, None)
  assert int(state.step) == 4
  ckpt.close()


def test_restore_params_names_the_damaged_step(damaged):
  run, tr = damaged
  DAMAGE["array files deleted"](run / "checkpoints" / "4")
  ckpt = checkpoints.Checkpointer(str(run / "checkpoints"), retries=NO_WAIT)
  with pytest.raises(CheckpointError, match=r"^checkpoint 4 in .* cannot be read \(corrupt: .+\); "
                     r"the run has other checkpoints \[2\]: pick one with its step$"):
    ckpt.restore_params(tr.abstract_state.params)
  params = ckpt.restore_params(tr.abstract_state.params, step=2)  # what the user then asks for
  assert len(jax.tree.leaves(params)) > 10
  with pytest.raises(CheckpointError, match=r"no checkpoint 3 in .*; it has \[2, 4\]"):
    ckpt.restore_params(tr.abstract_state.params, step=3)
  ckpt.close()


def test_init_from_names_the_damaged_step_and_skips_unfinished_ones(damaged):
  run, tr = damaged
  target = tr.init_state().params
  # A save a kill interrupted: Orbax's temporary directory. Never picked, and cleaned up by the
  # run's own Checkpointer on restart.
  tmp = run / "checkpoints" / "6.orbax-checkpoint-tmp-1234"
  shutil.copytree(run / "checkpoints" / "4", tmp)
  params, report = pretrained.load_params(str(run), target)
  assert not report["new"] and len(report["loaded"]) > 10
  loaded = checkpoints.Checkpointer(str(run / "checkpoints")).restore_params(
      tr.abstract_state.params, step=4)
  for a, b in zip(_leaves(params), _leaves(loaded)):
    np.testing.assert_array_equal(a, b)
  assert not tmp.exists()  # that Checkpointer cleaned up the temporary directory
  DAMAGE["array files deleted"](run / "checkpoints" / "4")
  with pytest.raises(CheckpointError, match=r"^init_from: checkpoint 4 \(.*/checkpoints/4\) "
                     r"cannot be read \(.+\); point init_from at another step directory$"):
    pretrained.load_params(str(run), target)


# --- failed saves --------------------------------------------------------------------------------

def _fail_commits(monkeypatch, times):
  """Makes the background commit of a checkpoint (Orbax renames its temporary directory, or on
  an object store writes `commit_success.txt`) raise a 503 `times[step]` times (None: always)."""
  # pylint: disable-next=import-outside-toplevel
  from orbax.checkpoint._src.checkpointers import async_checkpointer
  real, failed = async_checkpointer._on_commit_callback, []  # pylint: disable=protected-access

  def commit(tmpdir, *args, **kwargs):
    step = int(tmpdir.get_final().name)
    if step in times and (times[step] is None or failed.count(step) < times[step]):
      failed.append(step)
      raise OSError("503 Service Unavailable")
    return real(tmpdir, *args, **kwargs)
  monkeypatch.setattr(async_checkpointer, "_on_commit_callback", commit)
  return failed


@pytest.fixture
def quick_retries():
  """Retries without pauses, bound in gin as a user would (the train loop builds its
  Checkpointer)."""
  gin.clear_config()
  gin.bind_parameter("Retries.delay_s", 0.0)
  yield
  gin.clear_config()


def test_a_save_that_fails_for_a_moment_is_written_again(tiny_config, tmp_path, monkeypatch,
                                                         capsys, quick_retries):
  """Step 4's background save fails once (step 6 is its retry), and the final step 8's fails
  once (written again: its state is still there): the run ends normally."""
  failed = _fail_commits(monkeypatch, {4: 1, 8: 1})
  state = _train_classifier(tiny_config, tmp_path, nan_at=(), keep_gin=True)
  assert int(state.step) == 8 and failed == [4, 8]
  out = capsys.readouterr().out
  assert ("checkpoint 4 could not be written (503 Service Unavailable); writing step 6 instead "
          "in 0s (try 2 of 4)") in out
  assert ("checkpoint 8 could not be written (503 Service Unavailable); writing it again in 0s "
          "(try 2 of 4)") in out
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "6", "8"]  # no half-written one
  assert _all_checkpoints_finite(str(tmp_path)) == [2, 6, 8]


def test_a_save_that_keeps_failing_names_the_step_and_the_last_good_one(tiny_config, tmp_path,
                                                                        monkeypatch, caplog,
                                                                        quick_retries):
  """One line (the CLI's `error: ...`): no Orbax traceback logged on the way."""
  _fail_commits(monkeypatch, {6: None, 8: None})
  with pytest.raises(CheckpointError) as error:
    _train_classifier(tiny_config, tmp_path, nan_at=(), keep_gin=True)
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
  assert one_line(error.value) == (
      f"checkpoint 8 could not be written to {tmp_path}/checkpoints (503 Service Unavailable; 4 "
      f"saves in a row failed). The last good checkpoint is step 4 ({tmp_path}/checkpoints/4): "
      "run the same command to resume from it")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  assert _all_checkpoints_finite(str(tmp_path)) == [2, 4]


def test_a_full_disk_is_not_tried_again(tiny_config, tmp_path, monkeypatch, quick_retries):
  tr = trainer.Trainer(tiny_config(), Partitioner((1, 1, 1), devices=ONE_DEVICE), total_steps=4)
  state = tr.init_state()
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1)
  ckpt.save(state, step=1)
  ckpt.wait()
  calls = _flaky(monkeypatch, ocp.CheckpointManager, "save", fails=None,
                 error=OSError(28, "No space left on device"))
  with pytest.raises(CheckpointError, match=r"^checkpoint 2 could not be written to .* \(\[Errno "
                     r"28\] No space left on device\). The last good checkpoint is step 1 "):
    ckpt.save(state, step=2)
  assert calls == [2]
  ckpt.close()


# --- echoes of a failed read ----------------------------------------------------------------------

class _Unraisable:
  """Raises `error` as an unraisable exception (from `__del__`) when dropped."""

  def __init__(self, error):
    self.error = error

  def __del__(self):
    raise self.error


ECHO = Exception("Encountered error while reading array index: (slice(0, 32, 1),). See full "
                 "TensorStore details: <bound method spec of TensorStore({\n  'driver': 'zarr',"
                 "\n})>.")


def test_the_echoes_of_an_abandoned_read_are_quiet_and_nothing_else_is(damaged, monkeypatch,
                                                                        caplog):
  """The reads Orbax abandons when one array cannot be read end later, one traceback each (a
  restart past a damaged checkpoint printed one now and then); those alone are dropped."""
  run, tr = damaged
  DAMAGE["array files deleted"](run / "checkpoints" / "4")
  shown = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: shown.append(u.exc_value))
  monkeypatch.setattr(logging.getLogger("asyncio"), "filters", [])
  ckpt = checkpoints.Checkpointer(str(run / "checkpoints"))
  with pytest.raises(CheckpointError):
    ckpt.restore_params(tr.abstract_state.params, step=4)
  ckpt.close()
  gc.collect()
  shown.clear()
  other = ValueError("a bug elsewhere")
  for error in (ECHO, RuntimeError("Event loop is closed"), other):
    _Unraisable(error)
  assert shown == [other]
  caplog.clear()
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    for message in ("Task exception was never retrieved", "Future exception was never retrieved"):
      for error in (ECHO, other):
        logging.getLogger("asyncio").error(message, exc_info=(type(error), error, None))
  assert [(r.getMessage(), r.exc_info[1]) for r in caplog.records] == [
      ("Task exception was never retrieved", other),
      ("Future exception was never retrieved", other)]
  # A read Orbax had not started: its coroutine, collected, warns (another coroutine still does).
  with warnings.catch_warnings(record=True) as warned:
    _read_array_index_and_device_put()
    _another_coroutine()
    gc.collect()
  assert [str(w.message) for w in warned] == ["coroutine '_another_coroutine' was never awaited"]


async def _read_array_index_and_device_put():  # Orbax's name
  pass


async def _another_coroutine():
  pass


# --- the mistakes a user makes --------------------------------------------------------------------

@pytest.mark.parametrize("binding, message", [
    ("train.totl_steps = 5", "gin: Configurable 'train' doesn't have a parameter named "
                             "'totl_steps'. (did you mean 'total_steps'"),
    ("trian.total_steps = 5", "gin: No configurable matching 'trian'. (did you mean 'train'?)"),
    ("Partitioner.mesh_shap = (1, 1, 1)", "(did you mean 'mesh_shape'?)"),
])
def test_gin_mistakes_are_user_errors(binding, message):
  gin.clear_config()
  with pytest.raises(UserError) as error:
    gin_utils.parse_gin(["runs/synthetic_tiny.gin"], [binding])
  assert message in str(error.value) and str(error.value).startswith("gin: ")
  with pytest.raises(UserError, match="gin: Unable to open file: runs/nope.gin"):
    gin_utils.parse_gin(["runs/nope.gin"], [])
  gin.clear_config()


def test_run_settings_are_checked():
  with pytest.raises(UserError, match="train.total_steps must be a positive integer, got 'abc'"):
    train.train(model_dir="/tmp/unused", total_steps="abc", train_iterator_fn=None)


def test_mesh_that_does_not_fit_the_devices():
  with pytest.raises(UserError, match=r"mesh_shape \(3, 1, 1\) has 3 devices, but this run has "
                     r"8: make the product 8, or let one entry be -1"):
    resolve_mesh_shape((3, 1, 1), 8)
  with pytest.raises(UserError, match=r"mesh_shape \(-1, 3, 1\) does not divide 8 devices"):
    resolve_mesh_shape((-1, 3, 1), 8)


def test_unregistered_task_and_missing_data():
  kw = dict(image_text_batch_size=2, text_batch_size=2, image_text_length=8, text_length=8,
            image_size=32, shard_index=0, num_shards=1)
  with pytest.raises(UserError, match="No Task or Mixture found with name 'shapes_typo'"):
    pipeline.make_pretrain_iterator("shapes_typo", **kw)
  missing = tasks.register_shapes("64px", data_dir="/nonexistent/data", prefix="faults_missing")
  with pytest.raises(UserError, match="not built in /nonexistent/data"):
    pipeline.make_pretrain_iterator(missing, **kw)
  text = tasks.register_text_file("faults_no_text", train_files="/nonexistent/*.txt")
  with pytest.raises(UserError, match=r"split 'train': no file matches '/nonexistent/\*.txt'"):
    pipeline.make_pretrain_iterator(text, **{**kw, "image_text_batch_size": 0})


def test_batches_that_do_not_fit_the_model(tiny_config):
  config = tiny_config()  # 32 px, 32 text positions
  batch = SyntheticIterator(image_size=48, vocab_size=64)
  with pytest.raises(UserError, match="image_text images are 48x48 but the model takes 32x32"):
    trainer.check_batch(config, next(batch))
  long_rows = next(SyntheticIterator(image_size=32, text_length=40, vocab_size=64))
  with pytest.raises(UserError, match="the text batches have rows of 40 text tokens but the "
                     "model has 32 text positions"):
    trainer.check_batch(config, long_rows)
  finetune = {"image_text": {"images": np.zeros((2, 32, 32, 3), np.uint8),
                             "prefix_tokens": np.zeros((2, 20), np.int32),
                             "target_tokens": np.zeros((2, 16), np.int32)}}
  with pytest.raises(UserError, match="prefix \\+ target tokens of 36 text tokens"):
    trainer.check_batch(config, finetune)
  pairs = {"image_text": {"images": np.zeros((2, 2, 32, 32, 3), np.uint8),
                          "prefix_tokens": np.zeros((2, 8), np.int32),
                          "target_tokens": np.zeros((2, 4), np.int32)}}
  with pytest.raises(UserError, match=r"2 images each but the model takes at most 1 "
                     r"\(ModelConfig.max_images"):
    trainer.check_batch(config, pairs)
  trainer.check_batch(tiny_config(max_images=2), pairs)
  trainer.check_batch(config, next(SyntheticIterator(image_size=32, vocab_size=64)))  # fits


def test_prompt_longer_than_the_text_positions(tiny_config):
  config = tiny_config()
  tr = trainer.Trainer(config, Partitioner((1, 1, 1), devices=ONE_DEVICE), 1)
  fn = decoding.make_decode_fn(tr.model, max_decode_length=8)
  images = np.zeros((1, 32, 32, 3), np.uint8)
  with pytest.raises(UserError, match="a prompt of 30 tokens and max_decode_length 8 need 38 "
                     "text positions, the model has 32"):
    jax.eval_shape(fn, tr.abstract_state.params, images, np.ones((1, 30), np.int32))


def test_ctrl_c_stops_at_the_next_step_and_twice_stops_at_once(capsys):
  """SIGINT takes the SIGTERM path (save the step reached, exit 0; end to end for SIGTERM:
  tests/test_resume_pipeline.py and tests/test_multihost.py); a second Ctrl-C interrupts."""
  previous = signal.getsignal(signal.SIGINT)
  with preemption.PreemptionWatcher() as watcher:
    assert not watcher.reached(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert watcher.received == "SIGINT" and watcher.reached(2)
    assert capsys.readouterr().out == ("SIGINT received: stopping after the step in flight to save "
                                       "a checkpoint (Ctrl-C again to stop at once)\n")
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is previous  # the handlers are put back
