"""The pod workflow's faults, walked as a pod meets them (issue 28): a preemption notice during an
evaluation, a refusal that one process reaches, bindings given to `eval`, a host that cannot read
an image in `predict`, and the errors that must end in one line."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import gin
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from simvlm_jax import distributed, run_dir
from simvlm_jax import eval as eval_command  # noqa: F401  (registers `evaluate`, bound below)
from simvlm_jax.data import vocab
from simvlm_jax.errors import UserError
from conftest import SENTENCES, free_port, pair_env, process_env, write_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
SMALL = ["--gin.ModelConfig.num_encoder_layers=1", "--gin.ModelConfig.num_decoder_layers=1",
         "--gin.ModelConfig.resnet_stage_widths=(32,)",
         "--gin.ModelConfig.resnet_stage_blocks=(1,)"]


def _train_command(model_dir, *extra):
  return [sys.executable, "-m", "simvlm_jax.train", "--import_modules=",
          "--gin_file=gin/runs/synthetic_tiny.gin", f"--gin.train.model_dir='{model_dir}'",
          *SMALL, *extra]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_during_a_long_evaluation_saves_and_exits_within_a_bound(tmp_path, processes):
  """SIGTERM while the teacher-forced evaluation of step 4 runs (100,000 batches: an hour here):
  the evaluation is abandoned at its next batch, step 4 is saved, the run exits 0 in seconds.
  With two processes the signal goes to process 1 alone (JAX's notifier posts it for process 0).
  Before, the loop asked for the stop only after every evaluation had finished."""
  model_dir = tmp_path / "run"
  command = _train_command(
      model_dir, "--gin.train.total_steps=8", "--gin.train.log_every=4",
      "--gin.train.checkpoint_every=100", "--gin.train.eval_every=4",
      "--gin.train.eval_batches=100000", "--gin.train.eval_iterator_fn=@eval/SyntheticIterator",
      "--gin.eval/SyntheticIterator.num_examples=10000000",
      "--gin.Partitioner.mesh_shape=(-1, 1, 1)")
  address = f"127.0.0.1:{free_port()}"
  logs = [tmp_path / f"log{pid}" for pid in range(processes)]
  procs = []
  for pid, log in enumerate(logs):
    with open(log, "w") as out:
      procs.append(subprocess.Popen(
          command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True,
          env=pair_env(1, address, pid) if processes == 2 else process_env(1)))
  deadline = time.time() + 240
  while "step 4/8" not in logs[0].read_text():
    assert all(p.poll() is None for p in procs) and time.time() < deadline, \
        logs[0].read_text()[-3000:]
    time.sleep(0.05)
  time.sleep(1.0)  # well inside the evaluation
  procs[-1].send_signal(15)
  sent = time.time()
  statuses = [p.wait(timeout=120) for p in procs]
  text = logs[0].read_text()
  assert statuses == [0] * processes, text[-3000:] + logs[-1].read_text()[-3000:]
  assert time.time() - sent < 30, text[-3000:]
  assert "step 4: the teacher-forced evaluation was abandoned for the stop" in text
  assert re.search(r"stopped by (SIGTERM|a preemption notice) after step 4: saved checkpoint 4",
                   text), text[-3000:]
  assert ocp.path.step.checkpoint_steps(model_dir / "checkpoints") == [4]


@pytest.mark.slow
def test_a_refusal_on_one_process_ends_every_process(tmp_path):
  """A run restarted with another vocabulary on two processes: both end with the same `error:`
  line and status 2. Before, process 0 alone checked and left; process 1 waited in the
  restore's collectives until the coordination service gave up."""
  first = vocab.train_sentencepiece(SENTENCES, 300, "first", directory=str(tmp_path))
  other = vocab.train_sentencepiece(SENTENCES[::-1] + ["an other text"], 300, "other",
                                    directory=str(tmp_path))
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  shutil.copy(first, model_dir / run_dir.VOCABULARY_FILE)
  command = _train_command(
      model_dir, "--import_modules=synthetic_with_vocabulary", "--gin.VOCAB_SIZE=320",
      "--gin.train.total_steps=4", "--gin.train.train_iterator_fn=@SyntheticWithVocabulary",
      f"--gin.SyntheticWithVocabulary.model_path='{other}'",
      "--gin.SyntheticWithVocabulary.text_batch=8", "--gin.Partitioner.mesh_shape=(-1, 1, 1)")
  address = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=pair_env(2, address, pid, PYTHONPATH=TESTS))
           for pid in range(2)]
  outs = [p.communicate(timeout=150) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 2, err[-3000:]
    assert re.search(r"^error: .* was trained with the vocabulary in .*vocabulary\.model, but the "
                     r"data is now tokenized with .*other.*: a run cannot change its vocabulary",
                     err, re.M), err[-3000:]
  assert ocp.path.step.checkpoint_steps(model_dir / "checkpoints") == []


def _refuse_on(pid):
  def check():
    if distributed.jax.process_index() == pid:
      raise UserError("only here")
    return "fine"
  return check


def test_refuse_together_on_one_process():
  assert distributed.refuse_together(lambda: 3) == 3
  with pytest.raises(UserError, match="^only here$"):
    distributed.refuse_together(_refuse_on(0))
  assert distributed.all_processes_mask([True, False]).tolist() == [True, False]
  assert distributed.any_process(True) and not distributed.all_processes(False)


def test_eval_applies_the_users_bindings_and_refuses_parameter_changes(tmp_path, tiny_config):
  """`eval` opens the run with the command line's bindings over the run's config.gin: one that
  changes how the model computes holds, one that changes its parameters is refused."""
  model_dir, _ = write_run(tmp_path, tiny_config, vocab.train_sentencepiece(
      SENTENCES, 300, "a", directory=str(tmp_path)))
  try:
    run = run_dir.open_run(str(model_dir), restore=False)
    assert run.config.attention == "plain" and run.config.dtype == "float32"
    run = run_dir.open_run(str(model_dir), restore=False, overrides=(
        [], ["ModelConfig.attention = 'fused'", "ModelConfig.dtype = 'bfloat16'",
             "evaluate.batch_size = 4"]))
    assert run.config.attention == "fused" and run.config.dtype == "bfloat16"
    assert run.config.emb_dim == 32  # the run's own shapes, from its config.gin
    assert gin.query_parameter("evaluate.batch_size") == 4
    with pytest.raises(UserError, match=r"the bindings change the run's parameters \(mlp_dim: "
                       r".*mlp.* and more\); a run's checkpoints fit only its own model shapes"):
      run_dir.open_run(str(model_dir), restore=False,
                       overrides=([], ["ModelConfig.mlp_dim = 128"]))
    with pytest.raises(UserError, match="No configurable matching 'ModelConfg'"):
      run_dir.open_run(str(model_dir), restore=False,
                       overrides=([], ["ModelConfg.attention = 'fused'"]))
  finally:
    gin.clear_config()


@pytest.mark.slow
def test_predict_agrees_on_images_one_host_cannot_read(tmp_path, tiny_config):
  """Two predict processes whose working directories hold the same relative image names, where
  process 1's b.png is broken: b.png is reported on every process, a.png and c.png are predicted,
  one image a batch. Before, process 1 skipped b's batch and process 0 waited in its collective
  forever."""
  model_dir, _ = write_run(tmp_path, tiny_config, vocab.train_sentencepiece(
      SENTENCES, 300, "a", directory=str(tmp_path)))
  gin.clear_config()
  rng = np.random.default_rng(0)
  for pid in range(2):
    photos = tmp_path / f"host{pid}" / "photos"
    photos.mkdir(parents=True)
    for name in "abc":
      Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(photos / f"{name}.png")
  (tmp_path / "host1" / "photos" / "b.png").write_bytes(b"not a png")
  command = [sys.executable, "-m", "simvlm_jax.predict", f"--checkpoint_dir={model_dir}",
             "--image=photos", "--max_decode_length=3", "--batch_size=2", "--mesh=-1,1,1"]
  address = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen(command, cwd=tmp_path / f"host{pid}", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=pair_env(1, address, pid, PYTHONPATH=REPO))
           for pid in range(2)]
  # batch 2 over 2 devices: the first batch holds a and b, the second c alone.
  (out0, err0), (out1, _) = [p.communicate(timeout=240) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], err0[-3000:]
  assert [line.split("\t")[0] for line in out0.splitlines()] == ["photos/a.png", "photos/c.png"]
  assert out1 == ""
  assert "error: cannot read image photos/b.png: another process could not read it" in err0
  assert "2 of 3 images predicted; 1 could not be read" in err0


@pytest.mark.parametrize("command, env, message", [
    (["simvlm_jax.train", "--gin_file=gin/runs/synthetic_tiny.gin", "--gin.train.model_dir"], {},
     r"^error: expected --gin.KEY=VALUE, got '--gin.train.model_dir'"),
    (["simvlm_jax.eval", "--gin.evaluate.model_dir='x'"], {"SIMVLM_NUM_PROCESSES": "2"},
     r"^error: distributed settings: multi-process run needs \['coordinator_address', "
     r"'process_id'\] too"),
    (["simvlm_jax.predict", "--checkpoint_dir=x", "--image=y"],
     {"SIMVLM_NUM_PROCESSES": "2", "SIMVLM_PROCESS_ID": "5",
      "SIMVLM_COORDINATOR_ADDRESS": "127.0.0.1:1"},
     r"^error: distributed settings: process_id=5 is not in \[0, num_processes=2\)"),
    (["tasks.build", "vocab", "--from", "{few}", "--vocab_size", "8000"], {},
     r"^error: 2 sentences give at most \d+ pieces, not 8000: give more text or a smaller "
     "vocabulary size"),
])
def test_command_mistakes_end_in_one_line(tmp_path, command, env, message):
  few = tmp_path / "few.txt"
  few.write_text("a red circle\nthe blue square\n")
  out = subprocess.run([sys.executable, "-m", *[c.format(few=few) for c in command]], cwd=REPO,
                       env=process_env(1, **env), capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-3000:]
  assert re.search(message, out.stderr, re.M) and "Traceback" not in out.stderr, out.stderr[-3000:]


@pytest.mark.slow
def test_eval_shards_examples_over_processes_with_the_scores_of_one(tmp_path, tiny_config):
  """`eval` on two processes: each reads and decodes its shard of the split (9 VQA images: 5 and
  4 each, so one process feeds an empty batch at the end), process 0 scores the gathered
  predictions and writes the results: the scores and the predictions file of one process."""
  env = {"SIMVLM_DATA_DIR": str(tmp_path / "tfds"), "SIMVLM_CACHE_DIR": str(tmp_path / "cache")}
  subprocess.run([sys.executable, "-m", "tasks.build", "shapes_downstream", "--out_dir",
                  str(tmp_path / "raw"), "--train", "2", "--eval", "9", "--workers", "0"],
                 cwd=REPO, env=process_env(1, **env), check=True, capture_output=True)
  model_dir, _ = write_run(tmp_path, tiny_config, vocab.train_sentencepiece(
      SENTENCES, 300, "a", directory=str(tmp_path)))
  gin.clear_config()
  with open(model_dir / "config.gin", "a") as f:  # as a VQA finetuning run's config has them
    f.write("make_finetune_iterator.inputs_length = 16\n"
            "make_finetune_iterator.targets_length = 8\n")
  command = [sys.executable, "-m", "simvlm_jax.eval", "--gin_file=gin/eval.gin",
             f"--gin.evaluate.model_dir='{model_dir}'", "--gin.evaluate.task='shapes_vqa_v2'",
             "--gin.evaluate.batch_size=4", "--gin.evaluate.max_decode_length=3"]
  runs = {}
  for name, procs in (("one", 1), ("two", 2)):
    out_dir = tmp_path / name
    address = f"127.0.0.1:{free_port()}"
    started = [subprocess.Popen(
        [*command, f"--gin.evaluate.output_dir='{out_dir}'"], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env=(pair_env(1, address, pid, **env) if procs == 2 else process_env(1, **env)))
        for pid in range(procs)]
    outs = [p.communicate(timeout=300) for p in started]
    assert [p.returncode for p in started] == [0] * procs, outs[0][1][-3000:]
    assert all(out == "" for out, _ in outs[1:])  # process 0 alone reports
    scores = json.loads((out_dir / "scores.json").read_text())["7"]
    rows = [json.loads(line) for line in (out_dir / "predictions_7.jsonl").read_text().splitlines()]
    runs[name] = ({k: v for k, v in scores.items() if not k.endswith("_seconds")}, rows)
  (one, one_rows), (two, two_rows) = runs["one"], runs["two"]
  assert one["examples"] == len(one_rows) > 9  # several questions an image, an odd count
  assert len(one_rows) % 2 == 1 or len(one_rows) % 4  # the two shards are uneven
  assert two == one
  assert two_rows == one_rows
