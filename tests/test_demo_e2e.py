"""End to end on the embedded data: the demo (build, pretrain, captions, held-out accuracy,
finetuning on captioning from the pretrained model and from scratch, zero-shot captioning) on a
schedule just long enough to learn, checked for learning; then the predict command on its
checkpoint, errors included. (The demo's text-only comparison run is skipped here.)"""
import collections
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from conftest import command_xla_flags, predict_here
from simvlm_jax.errors import UserError
from simvlm_jax.metrics import captions as caption_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 120


def _env(tmp):
  env = dict(os.environ)
  env["XLA_FLAGS"] = command_xla_flags()
  env["SIMVLM_CACHE_DIR"] = str(tmp / "cache")
  return env


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("demo")
  # 120 pretraining steps of 16 + 4 rows and 30 finetuning steps of 16 rows: about 3 minutes,
  # enough that learning shows (below); the other benchmarks end to end: tests/test_eval.py.
  out = subprocess.run(
      [sys.executable, "-m", "tasks.demo", f"--workdir={tmp / 'work'}",
       f"--steps={STEPS}", "--gin", "IMAGE_TEXT_BATCH_SIZE = 16", "--gin", "TEXT_BATCH_SIZE = 4",
       "--train_images=512", "--heldout_images=64", "--text_statements=1000",
       "--skip_text_only",  # (its 120 steps would cost a minute of `make test`)
       "--downstream", "captioning", "--finetune_steps=30", "--finetune_gin", "BATCH_SIZE = 16",
       "--downstream_train=256",
       "--downstream_eval=32", "--downstream_eval_examples=32"],
      cwd=REPO, env=_env(tmp), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  # The quiet console: no library logging (simvlm_jax.console), only our one warning that SPICE
  # is not computed offline.
  assert out.stderr.splitlines() == [f"warning: {caption_metrics.SPICE_UNAVAILABLE}"]
  assert "Downloading and preparing" not in out.stdout  # nor TFDS's build lines
  return tmp, out.stdout


def _constant_guess_accuracy(work, split):
  """The held-out token accuracy (as the demo prints it) of the best constant guess, from the
  data: what a model that learned the tokens' frequencies and nothing else scores. The demo's
  accuracy is teacher-forced over the targets of PrefixLM's split of one caption per image: a row
  of n tokens (EOS included) keeps k ~ U[0, n - 1] of them as its prefix, so its token i is a
  target with probability (i + 1) / n; each of an image's captions is equally likely."""
  import seqio  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  vocabulary = seqio.SentencePieceVocabulary(str(work / "pretrain" / "vocabulary.model"))
  examples = tfds.load("shapes_world/64px", split=split, data_dir=str(work / "tfds"),
                       decoders={"image": tfds.decode.SkipDecoding()})
  expected, targets = collections.Counter(), 0.0
  for example in tfds.as_numpy(examples):
    captions = example["captions"]
    for caption in captions:
      ids = list(vocabulary.encode(caption.decode())) + [1]  # EOS
      for i, token in enumerate(ids):
        expected[token] += (i + 1) / len(ids) / len(captions)
      targets += (len(ids) + 1) / 2 / len(captions)
  return max(expected.values()) / targets


def _predict(tmp, *args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "simvlm_jax.predict", *args], cwd=cwd,
                        env=_env(tmp), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_demo_prints_captions_and_accuracies(demo):
  tmp, stdout = demo
  assert len(re.findall(r"^held-out image \d+:$", stdout, re.M)) == 8
  assert stdout.count("reference :") == 8 * 5
  assert stdout.count("model     : a picture of") == 8
  # Each caption checked against its scene (tasks/shapes_caption_check.py), then pooled.
  checked = re.findall(r"checked   : (\d+)/(\d+) claims true, (\d+)/(\d+) objects named, "
                       r"(right|wrong) about colour and shape", stdout)
  assert len(checked) == 8
  assert all(int(t) <= int(c) and int(n) <= int(o) for t, c, n, o, _ in checked)
  pooled = re.search(r"caption correctness on 8 held-out images: (\d+% of the \d+ colours, shapes, "
                     r"sizes and counts stated are true|no colour, shape, size or count is stated); "
                     r"\d+% of the objects are named; (\d+)% of the captions are right about every "
                     r"colour and shape they state", stdout)
  right = sum(verdict == "right" for *_, verdict in checked)
  assert pooled and int(pooled.group(2)) == round(100 * right / 8)
  rows = [line.split() for line in stdout.splitlines() if line.strip().startswith(("image-text",
                                                                                  "text only"))]
  assert len(rows) == 1  # the text-only comparison is skipped here
  # The held-out token accuracies (validation, compositional) against the best constant guess on
  # the same captions (0.160 and 0.155 on this data; the model: 0.43 and 0.41): a model that
  # learned the token frequencies alone, or a printed number that is no accuracy of these
  # targets, stays near or under it.
  (row,) = rows
  for printed, split in zip(map(float, row[-2:]), ("validation", "compositional")):
    chance = _constant_guess_accuracy(tmp / "work", split)
    assert 2 * chance < printed <= 1.0, (split, printed, chance)

  # The downstream table is what eval wrote (the last checkpoint's scores.json, 100 x CIDEr), and
  # CIDEr-D is the mean of its per-image scores in predictions_<step>.jsonl: the 32 examples
  # asked for (--downstream_eval_examples), for the finetuned runs (30 steps) and zero-shot
  # captioning with the pretrained run (120 steps).
  pretrained, scratch = re.search(r"^  captioning   CIDEr +([\d.]+) +([\d.]+) +30$", stdout,
                                  re.M).groups()
  zero_shot = re.search(r"^  captioning   CIDEr +([\d.]+)   \(pretrained model, no finetuning",
                        stdout, re.M).group(1)
  for printed, run, step in ((pretrained, "downstream/coco_caption_pretrained", "30"),
                             (scratch, "downstream/coco_caption_scratch", "30"),
                             (zero_shot, "pretrain", str(STEPS))):
    out_dir = tmp / "work" / run / "eval_shapes_coco_captions"
    scores = json.loads((out_dir / "scores.json").read_text())
    assert list(scores) == [step], (run, list(scores))
    per_image = [json.loads(line)["score"]["CIDEr"]
                 for line in (out_dir / f"predictions_{step}.jsonl").read_text().splitlines()]
    assert len(per_image) == scores[step]["examples"] == 32
    assert scores[step]["CIDEr"] == pytest.approx(sum(per_image) / 32)
    assert float(printed) == pytest.approx(100 * scores[step]["CIDEr"], abs=0.005), run


@pytest.mark.slow
def test_the_demo_learns(demo):
  """Learning, not just running: after 120 steps the held-out captions are far above chance
  token accuracy, and captioning finetuned from the pretrained model beats the same finetuning
  from scratch. Measured on this schedule, seeds 0 / 1: held-out accuracy 0.429 / 0.445
  (compositional 0.409 / 0.412); captioning CIDEr from the pretrained model 18.8 / 33.0, from
  scratch 10.4 / 0.0 (it writes "a large the", or nothing). The thresholds leave room for both."""
  _, stdout = demo
  validation, compositional = map(float, re.search(
      r"^  image-text \+ text +([\d.]+) +([\d.]+)$", stdout, re.M).groups())
  assert validation > 0.35 and compositional > 0.3
  pretrained, scratch = map(float, re.search(  # and the finetuning steps, --finetune_steps
      r"^  captioning   CIDEr +([\d.]+) +([\d.]+) +30$", stdout, re.M).groups())
  assert pretrained > scratch + 4.0, (pretrained, scratch)
  assert re.search(r"^  captioning   CIDEr +\d+\.\d\d   \(pretrained model, no finetuning", stdout,
                   re.M)  # zero-shot


def test_finetune_steps_per_benchmark():
  from tasks import demo as demo_lib  # pylint: disable=import-outside-toplevel
  assert demo_lib.finetune_steps(300, ["VQA=1000", "SNLI-VE=800"]) == {
      "VQA": 1000, "NLVR2": 300, "SNLI-VE": 800, "captioning": 300, "text NLI": 800}
  assert set(demo_lib.finetune_steps(80).values()) == {80}
  for bad in ("vqa=1000", "VQA", "VQA=", "VQA=0", "VQA=ten"):
    with pytest.raises(SystemExit, match=f"--finetune_steps_for '{bad}': expected NAME=STEPS "
                       "with NAME one of VQA, NLVR2, SNLI-VE, captioning"):
      demo_lib.finetune_steps(300, [bad])


@pytest.mark.slow
def test_predict_command(demo, monkeypatch):
  tmp, _ = demo
  model_dir = str(tmp / "work" / "pretrain")
  images = tmp / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (80, 100, 3), np.uint8)).save(images / "a.png")
  Image.fromarray(rng.integers(0, 255, (64, 64), np.uint8)).convert("P").save(images / "b.png")
  out = _predict(tmp, f"--checkpoint_dir={model_dir}", f"--image={images}/*.png",
                 "--format=json", "--beam_size=2", "--max_decode_length=6")
  assert out.returncode == 0, out.stderr[-2000:]
  results = [json.loads(line) for line in out.stdout.splitlines()]
  assert [os.path.basename(r["image"]) for r in results] == ["a.png", "b.png"]
  assert all(r["prompt"] == "a picture of" and isinstance(r["prediction"], str) for r in results)

  # A folder with a broken file among the good ones, from its own directory with relative paths
  # (as the README has it): one line for the broken file, a result for every other, exit 0.
  (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  (images / "notes.txt").write_text("not an image: skipped by its extension")
  folder = _predict(tmp, "--checkpoint_dir=work/pretrain", "--image=images", cwd=tmp)
  assert folder.returncode == 0, folder.stderr[-2000:]
  assert [line.split("\t")[0] for line in folder.stdout.splitlines()] == ["images/a.png",
                                                                          "images/b.png"]
  broken, summary = folder.stderr.splitlines()
  assert broken.startswith("error: cannot read image images/broken.jpg: ") and "[Op:" not in broken
  assert summary == "2 of 3 images predicted; 1 could not be read"

  # The rest through the command's function, in this process (the command-line wrapper maps its
  # UserError to "error: ..." and exit status 2, tests/test_fault_commands.py).
  monkeypatch.chdir(tmp)
  text, _, status = predict_here(checkpoint_dir=model_dir, image=f"{images}/a.png")
  assert status == 0 and text.startswith(f"{images}/a.png\t")
  assert text == folder.stdout.splitlines()[0].replace("images/", f"{images}/") + "\n"
  with pytest.raises(UserError, match="^cannot read image images/broken.jpg: "):
    predict_here(checkpoint_dir="work/pretrain", image="images", strict=True)
  _, err, status = predict_here(checkpoint_dir=model_dir, image=f"{images}/broken.jpg")
  assert status == 1 and err.splitlines()[-1] == "error: no image could be read"
  # The step directory of a checkpoint works as well as its run.
  step, _, status = predict_here(checkpoint_dir=f"work/pretrain/checkpoints/{STEPS}",
                                  image="images/a.png")
  assert status == 0 and step == "images/a.png\t" + text.split("\t")[1]

  # (A folder that is no run: tests/test_fault_commands.py.)

  # An embedding larger than the vocabulary is fine (padded rows); a smaller one is not.
  mismatch = tmp / "mismatch"
  shutil.copytree(model_dir, mismatch)
  config = (mismatch / "config.gin").read_text().replace("VOCAB_SIZE = 512", "VOCAB_SIZE = 500")
  (mismatch / "config.gin").write_text(config)
  with pytest.raises(UserError) as wrong:
    predict_here(checkpoint_dir=str(mismatch), image=f"{images}/a.png")
  assert str(wrong.value) == (
      "the vocabulary has 512 ids but the model embeds only 500 (ModelConfig.vocab_size): "
      "set VOCAB_SIZE to at least 512, or tokenize with a smaller vocabulary "
      "(sentencepiece_vocabulary.model_path)")
