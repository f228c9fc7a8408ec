"""The eval command: task -> metric dispatch with hand-computed scores, and (slow) the whole path:
pretrain a tiny model, finetune it with init_from, evaluate with the official metrics."""
import json
import operator
import os
import re
import shutil
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
import seqio
from PIL import Image
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

from simvlm_jax import decoding
from simvlm_jax import eval as eval_command
from simvlm_jax import evaluators as eval_lib
from simvlm_jax import predict, run_dir
from simvlm_jax.data import finetune
from simvlm_jax.errors import UserError
from simvlm_jax.metrics import captions as caption_metrics
from tasks import build, shapes_caption_check
from tasks.downstream import registration
from conftest import free_port, pair_env, predict_here, process_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_of():
  assert eval_lib.benchmark_of("shapes_vqa_v2") == "vqa_v2"
  assert eval_lib.benchmark_of("snli_ve_text") == "snli_ve_text"
  with pytest.raises(ValueError, match="no metric"):
    eval_lib.benchmark_of("shapes64_image_text")


def test_vqa_scores():
  meta = [{"answers": np.array([b"yes"] * 10), "answer_type": b"yes/no", "question_type": b"is"},
          {"answers": np.array([b"2"] * 2 + [b"3"] * 8), "answer_type": b"number",
           "question_type": b"how many"}]
  scores, per_example = eval_lib.score("vqa_v2", ["Yes", "two"], meta, vqa_metric_version="2016")
  # "two" -> "2", given by 2 of 10 humans: each of the 8 others' leave-one-out sets has 2
  # matches (2/3), the 2 matching humans' have 1 (1/3): (8 * 2/3 + 2 * 1/3) / 10 = 0.6.
  assert per_example == pytest.approx([100.0, 60.0])
  assert scores["accuracy"] == pytest.approx(80.0)
  assert scores["per_answer_type"] == pytest.approx({"yes/no": 100.0, "number": 60.0})
  assert scores["examples"] == 2 and scores["vqa_metric_version"] == "2016"
  # The default, "2021", normalises neither side when all ten answers agree: "Yes" != "yes".
  scores, per_example = eval_lib.score("vqa_v2", ["Yes", "two"], meta)
  assert per_example == pytest.approx([0.0, 60.0])
  assert scores["accuracy"] == pytest.approx(30.0) and scores["vqa_metric_version"] == "2021"


def test_classification_scores_invalid_text_is_wrong():
  meta = [{"targets_pretokenized": t} for t in (b"entailment", b"neutral", b"contradiction",
                                                b"neutral")]
  scores, per_example = eval_lib.score("snli_ve", ["entailment", " Neutral", "maybe", "contra"],
                                       meta)
  assert scores["accuracy"] == 50.0 and per_example == [100.0, 100.0, 0.0, 0.0]
  assert scores["confusion_matrix"][2][3] == 1  # "maybe" -> <other>
  nlvr2, _ = eval_lib.score("nlvr2", ["true", "true"], [{"targets_pretokenized": b"true"},
                                                        {"targets_pretokenized": b"false"}])
  assert nlvr2["accuracy"] == 50.0


def test_nocaps_cider_per_domain():
  """NoCaps reports CIDEr-D per domain, each over that domain's images alone. A prediction equal
  to all 5 of its (distinct-worded) references scores 10, one sharing no word scores 0."""
  perfect = ["red ball on green grass", "two blue cars near tall trees",
             "an old man reading newspapers", "small dog chasing yellow frisbee"]
  wrong = "zebra zebra zebra zebra"
  # (domain, references, prediction): in-domain all right, near-domain half, out-domain none.
  rows = [("in-domain", perfect[0], perfect[0]), ("in-domain", perfect[1], perfect[1]),
          ("near-domain", perfect[2], perfect[2]), ("near-domain", perfect[3], wrong),
          ("out-domain", "purple kite over sandy beach", wrong),
          ("out-domain", "three white boats in harbour", wrong)]
  meta = [{"captions": np.array([ref.encode()] * 5), "domain": domain.encode()}
          for domain, ref, _ in rows]
  scores, per_image = eval_lib.score("nocaps", [p for _, _, p in rows], meta,
                                     caption_metric_names=("CIDEr",))
  assert scores["CIDEr_in-domain"] == pytest.approx(10.0)
  assert scores["CIDEr_near-domain"] == pytest.approx(5.0)
  assert scores["CIDEr_out-domain"] == pytest.approx(0.0)
  assert scores["CIDEr"] == pytest.approx(5.0) and scores["examples"] == 6
  assert [s["CIDEr"] for s in per_image] == pytest.approx([10, 10, 10, 0, 0, 0])


def test_shapes_captions_are_checked_against_their_scenes():
  """Caption correctness beside CIDEr for the shapes world's caption tasks (their "scene"
  feature): image 0 "a large red circle" on a large red circle = 3 of 3 claims, 1 of 1 object;
  image 1 "a small blue square" on a small blue diamond and a large green star = 0 of 3 claims
  (no square, so its colour and size are not true of one either), 0 of 2 objects; image 2 has
  no scene and is left out: 3 of 6 claims, 1 of 3 objects."""
  scene = lambda *objects: json.dumps({"objects": [
      {"colour": c, "shape": s, "size": z, "x": 0.5, "y": 0.5} for z, c, s in objects]})
  meta = [{"captions": np.array([b"a large red circle"]),
           "scene": scene(("large", "red", "circle")).encode()},
          {"captions": np.array([b"a small blue diamond"]),
           "scene": scene(("small", "blue", "diamond"), ("large", "green", "star")).encode()},
          {"captions": np.array([b"a small cross"]), "scene": b""}]
  checks = [shapes_caption_check.caption_correctness]  # the shapes caption tasks' metric fn
  scores, _ = eval_lib.score("coco_captions", ["a large red circle", "a small blue square",
                                               "a small cross"], meta,
                             caption_metric_names=("CIDEr",), example_metrics=checks)
  assert scores["caption_correctness"] == {"precision": pytest.approx(50.0),
                                           "recall": pytest.approx(100 * 1 / 3), "right": 50.0,
                                           "captions": 2, "claims": 6}
  assert eval_lib.numeric(scores)["caption_correctness/recall"] == pytest.approx(100 / 3)
  plain, _ = eval_lib.score("coco_captions", ["a large red circle"],
                            [{"captions": np.array([b"a large red circle"])}],
                            caption_metric_names=("CIDEr",), example_metrics=checks)
  assert "caption_correctness" not in plain  # COCO itself has no scenes


def test_image_controls():
  pairs = np.random.default_rng(0).integers(0, 255, (3, 2, 4, 4, 3), np.uint8)
  np.testing.assert_array_equal(eval_lib.control_images(pairs, "given", "t"), pairs)
  grey = eval_lib.control_images(pairs, "grey", "t")
  assert grey.shape == pairs.shape and grey.dtype == np.uint8 and np.all(grey == 128)
  swapped = eval_lib.control_images(pairs, "swapped", "t")
  np.testing.assert_array_equal(swapped[:, 0], pairs[:, 1])
  np.testing.assert_array_equal(swapped[:, 1], pairs[:, 0])
  with pytest.raises(UserError, match="images='swapped' needs image pairs .*'shapes_vqa_v2' has "
                     "one image per example"):
    eval_lib.control_images(pairs[:, 0], "swapped", "shapes_vqa_v2")


def test_numeric_flattening():
  flat = eval_lib.numeric({"accuracy": 1, "per": {"a": 2.0}, "method": "beam", "x": None,
                            "ok": True})
  assert flat == {"accuracy": 1.0, "per/a": 2.0}


def _data_env(tmp):
  return {"SIMVLM_DATA_DIR": str(tmp / "tfds"), "SIMVLM_CACHE_DIR": str(tmp / "cache")}


def _env(tmp):
  return process_env(1, **_data_env(tmp))


def _scalars(model_dir):
  """{tag: {step: value}} of a run's TensorBoard events."""
  out = {}
  for path in model_dir.glob("events.out.tfevents.*"):
    for event in event_file_loader.EventFileLoader(str(path)).Load():
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "scalars":
          out.setdefault(value.tag, {})[event.step] = float(
              tensor_util.make_ndarray(value.tensor))
  return out


def _run(tmp, *args, timeout=600):
  out = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=_env(tmp),
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return out.stdout


def _rows(out_dir, step):
  """The rows of an evaluation's predictions_<step>.jsonl."""
  return [json.loads(line) for line in (out_dir / f"predictions_{step}.jsonl").read_text()
          .splitlines()]


_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_NUMBER_WORDS = dict(zip("none zero one two three four five six seven eight nine ten".split(),
                         "0 0 1 2 3 4 5 6 7 8 9 10".split()))


def _official_form(text):
  """An answer as GT-Vision-Lab/VQA's vqaEval.py compares it once the human answers differ: a
  punctuation mark that touches a space (or any, in a text with a digit-comma-digit) deleted, any
  other a space; periods not before a digit deleted; lower case, number words as digits, no
  articles. (Its contractions table is left out: no text of the shapes world has an apostrophe.)"""
  assert "'" not in text, text
  deleted = re.search(r"\d,\d", text) is not None
  out = text
  for p in _PUNCTUATION:
    out = out.replace(p, "" if deleted or p + " " in text or " " + p in text else " ")
  out = re.sub(r"\.(?!\d)", "", out)
  return " ".join(_NUMBER_WORDS.get(w, w) for w in out.lower().split()
                  if w not in ("a", "an", "the"))


def _vqa_accuracy(prediction, answers):
  """VQA accuracy in its 2021 version, written out here: tabs and newlines as spaces and both
  sides stripped; both sides in `_official_form` if the human answers differ, else compared as
  they are; the mean over the 10 humans of min(1, #others who gave the prediction / 3)."""
  clean = lambda t: t.replace("\n", " ").replace("\t", " ").strip()  # noqa: E731
  answers, prediction = [clean(a) for a in answers], clean(prediction)
  if len(set(answers)) > 1:
    answers, prediction = [_official_form(a) for a in answers], _official_form(prediction)
  return sum(min(1.0, sum(a == prediction for j, a in enumerate(answers) if j != i) / 3)
             for i in range(len(answers))) / len(answers)


def test_vqa_accuracy_written_out():
  """`_vqa_accuracy` (what the end-to-end test recomputes the written VQA scores with) on
  hand-worked cases: 2 of 10 humans -> (8 x 2/3 + 2 x 1/3) / 10; 3 of 10 -> (7 x 1 + 3 x 2/3) / 10;
  ten identical answers compare unnormalised; differing ones normalise both sides."""
  assert _vqa_accuracy("two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
  assert _vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)
  assert _vqa_accuracy("Yes", ["yes"] * 10) == 0.0 and _vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
  assert _vqa_accuracy("The Dark-Red.", ["dark red"] * 9 + ["red"]) == pytest.approx(1.0)
  assert _vqa_accuracy("red", ["dark red"] * 9 + ["red"]) == pytest.approx(0.3)


def _check_vqa(scores, rows):
  """A VQA evaluation against its predictions file: each row's score is the 2021 VQA accuracy
  (recomputed by `_vqa_accuracy`) of its prediction against the ten human answers written beside
  it, and the accuracy overall and per answer type is the mean of the rows' scores."""
  assert scores["vqa_metric_version"] == "2021" and scores["examples"] == len(rows)
  for r in rows:
    assert len(r["answers"]) == 10
    assert r["score"] == pytest.approx(100 * _vqa_accuracy(r["prediction"], r["answers"])), r
  mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
  assert scores["accuracy"] == pytest.approx(mean([r["score"] for r in rows]))
  assert scores["per_answer_type"] == pytest.approx({
      t: mean([r["score"] for r in rows if r["answer_type"] == t])
      for t in {r["answer_type"] for r in rows}})


def _check_classification(scores, rows, classes):
  """An NLVR2 / SNLI-VE evaluation against its predictions file: a prediction is right when it is
  its row's label (after strip and lower case), anything else is wrong (the confusion matrix's
  last column); accuracy, per-class accuracy, the confusion matrix and every row's score follow."""
  said = [r["prediction"].strip().lower() for r in rows]
  said = [p if p in classes else "<other>" for p in said]
  labels = [r["targets_pretokenized"] for r in rows]
  assert set(labels) <= set(classes) and scores["examples"] == len(rows)
  assert [r["score"] for r in rows] == [100.0 * (p == t) for p, t in zip(said, labels)]
  assert scores["accuracy"] == pytest.approx(100 * sum(map(operator.eq, said, labels)) / len(rows))
  assert scores["per_class_accuracy"] == pytest.approx({
      c: 100 * sum(p == c for p, t in zip(said, labels) if t == c) / labels.count(c)
      for c in classes if c in labels})
  assert scores["confusion_matrix"] == [
      [sum(p == column and t == c for p, t in zip(said, labels))
       for column in (*classes, "<other>")] for c in classes]


def _greedy_reference(model_dir, image_paths, prompt, length):
  """Greedy decoding written out without the decoder's cache: each next token is the argmax of
  the teacher-forced logits (the model's __call__ over the prompt and the tokens so far) at its
  position, padding (id 0) never chosen. Returns (the text of the tokens before EOS, their summed
  log-probabilities, EOS included)."""
  run = run_dir.open_run(str(model_dir))  # its config, vocabulary and newest parameters
  gin.clear_config()
  images = np.stack([predict.load_image(str(p), run.config.image_size) for p in image_paths])
  images = images[None] if len(image_paths) > 1 else images  # [1, 2, H, W, 3]: a pair
  prefix = np.array([run.vocabulary.encode(prompt)], np.int32)
  positions = prefix.shape[1] + np.arange(length, dtype=np.int32)[None]
  forward = jax.jit(lambda p, im, pre, dec, pos: run.model.apply({"params": p}, im, pre, dec, pos))
  ids, total = [], 0.0
  for step in range(length):
    decoder_input = np.zeros((1, length), np.int32)
    decoder_input[0, 1:step + 1] = ids
    logits = np.asarray(forward(run.params, images, prefix, decoder_input, positions),
                        np.float64)[0, step]
    logits[0] = -np.inf
    log_probs = logits - logits.max() - np.log(np.sum(np.exp(logits - logits.max())))
    ids.append(int(np.argmax(log_probs)))
    total += log_probs[ids[-1]]
    if ids[-1] == 1:  # EOS
      break
  text = run.vocabulary.decode([i for i in ids if 1 < i < run.vocabulary.vocab_size])
  return text, total


@pytest.mark.slow
def test_pretrain_finetune_evaluate(tmp_path, monkeypatch):
  data = str(tmp_path / "tfds")
  # The data in this process (the build command itself: tests/test_resume_pipeline.py,
  # tests/test_own_data_e2e.py); the vocabulary goes to the cache the commands below read.
  for name, value in _data_env(tmp_path).items():
    monkeypatch.setenv(name, value)
  build.main(["--data_dir", data, "shapes", "--train", "32", "--validation", "16",
              "--compositional", "16", "--text_train", "64", "--text_validation", "16",
              "--workers", "0"])
  build.main(["--data_dir", data, "shapes_downstream", "--out_dir", str(tmp_path / "raw"),
              "--train", "16", "--eval", "12", "--workers", "0"])
  pretrain = tmp_path / "pretrain"
  _run(tmp_path, "simvlm_jax.train", "--gin_file=runs/demo_pretrain.gin",
       f"--gin.train.model_dir='{pretrain}'", "--gin.train.total_steps=2",
       "--gin.train.eval_iterator_fn=None", "--gin.IMAGE_TEXT_BATCH_SIZE=4",
       "--gin.TEXT_BATCH_SIZE=2")
  # The NLVR2 run starts from a release of the pretraining run (parameters, config, vocabulary).
  release = tmp_path / "release"
  stdout = _run(tmp_path, "simvlm_jax.export", f"--model_dir={pretrain}", f"--out_dir={release}")
  assert stdout.startswith(f"exported step 2 of {pretrain}: ") and stdout.strip().endswith(
      f" MiB, no optimizer state) -> {release}")
  # NLVR2 finetuning in two processes (2 CPU devices each, the batch over all 4), its official
  # metric evaluated inside training after every step (every process decodes every example), the
  # best checkpoint by it kept beside the newest.
  finetuned = tmp_path / "nlvr2"
  address = f"127.0.0.1:{free_port()}"
  command = [sys.executable, "-m", "simvlm_jax.train", "--gin_file=models/simvlm_tiny.gin",
             "--gin_file=finetune/nlvr2.gin", "--gin_file=runs/demo_finetune.gin",
             "--gin.TASK='shapes_nlvr2'", f"--gin.PRETRAINED_DIR='{release}'",
             f"--gin.train.model_dir='{finetuned}'", "--gin.train.total_steps=2",
             "--gin.BATCH_SIZE=4", "--gin.train.evaluators={'official': @official/OfficialMetric()}",
             "--gin.EVAL_EVERY=1", "--gin.train.keep_best_by='eval/official/accuracy'",
             "--gin.train.keep_best_mode='max'"]
  procs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=pair_env(2, address, pid, **_data_env(tmp_path)))
           for pid in range(2)]
  (stdout, err0), (out1, err1) = [proc.communicate(timeout=600) for proc in procs]
  assert [p.returncode for p in procs] == [0, 0], stdout[-2000:] + err0[-3000:] + err1[-3000:]
  assert out1 == ""  # process 1 prints nothing
  report = next(line for line in stdout.splitlines() if line.startswith("initialised from"))
  # New at finetuning: the embedding that tells the pair's images apart (gin/finetune/nlvr2.gin).
  assert int(report.split(": ")[1].split(" loaded")[0]) > 50 and "1 new" in report
  assert "new: image_index/embedding" in stdout
  assert "step 2/2" in stdout
  in_loop = {int(line.split()[1]): float(line.split(" accuracy ")[1].split()[0])
             for line in stdout.splitlines() if line.startswith("step ") and "eval/official:" in line}
  assert sorted(in_loop) == [1, 2] and "(12 examples, greedy, " in stdout
  tensorboard = _scalars(finetuned)
  assert {s: round(v, 2) for s, v in tensorboard["eval/official/accuracy"].items()} == in_loop
  assert "eval/official/per_class_accuracy/true" in tensorboard
  # keep_checkpoints = 1 (the newest, 2) and the best by accuracy (ties: the newest).
  kept = sorted(int(d) for d in os.listdir(finetuned / "checkpoints") if d.isdigit())
  assert kept == ([1, 2] if in_loop[1] > in_loop[2] else [2]), (kept, in_loop)

  # The eval command on one device scores what training scored on four in two processes.
  _run(tmp_path, "simvlm_jax.eval", "--gin_file=gin/eval.gin",
       f"--gin.evaluate.model_dir='{finetuned}'", "--gin.evaluate.task='shapes_nlvr2'",
       "--gin.evaluate.batch_size=5")
  out_dir = finetuned / "eval_shapes_nlvr2_validation"
  scores = json.loads((out_dir / "scores.json").read_text())
  assert list(scores) == [str(s) for s in kept]
  assert {int(s): round(v["accuracy"], 2) for s, v in scores.items()} == {
      s: in_loop[s] for s in kept}
  assert scores["2"]["method"] == "greedy"
  rows = _rows(out_dir, 2)
  assert len(rows) == 12  # 6 image pairs x 2 statements
  assert all(set(r) >= {"prompt", "prediction", "targets_pretokenized", "identifier", "score"}
             for r in rows)
  # The statement is the prompt, the label (1 = true) its target; the scores follow from the rows.
  statements = {(r["identifier"], r["sentence"]): r["label"] for r in map(
      json.loads, (tmp_path / "raw" / "nlvr2" / "dev.json").read_text().splitlines())}
  assert {(r["identifier"], r["prompt"]): r["targets_pretokenized"] for r in rows} == {
      key: label.lower() for key, label in statements.items()}
  _check_classification(scores["2"], rows, ("true", "false"))
  html = (out_dir / "report_2.html").read_text()
  assert html.count('<tr id="example-') == 12 and "data:image/jpeg;base64" in html
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(out_dir))
  # The control with each pair reversed (in this process, "shapes_nlvr2" reading this test's
  # data): the model is shown exactly that, and the scores go beside the real ones.
  here = registration.register_downstream("nlvr2", "shapes", data, name="eval_test_nlvr2")
  registry = seqio.TaskRegistry._REGISTRY  # pylint: disable=protected-access
  monkeypatch.setitem(registry, "shapes_nlvr2", seqio.get_mixture_or_task(here))
  shown, jitted = [], decoding.jitted

  def recording_jitted(*args, **kwargs):
    decode = jitted(*args, **kwargs)
    return lambda params, images, prefix: (shown.append(np.asarray(images)),
                                           decode(params, images, prefix))[1]
  monkeypatch.setattr(decoding, "jitted", recording_jitted)
  controlled = eval_command.evaluate(model_dir=str(finetuned), task="shapes_nlvr2", steps=[2],
                                     batch_size=12, images="swapped")
  assert controlled[2]["images"] == "swapped" and controlled[2]["examples"] == 12
  assert json.loads((finetuned / "eval_shapes_nlvr2_validation_swapped" / "scores.json")
                    .read_text())["2"]["images"] == "swapped"
  pairs = next(finetune.make_finetune_iterator(
      "shapes_nlvr2", batch_size=12, inputs_length=32, targets_length=8, image_size=64,
      split="validation", train=False, shard_index=0, num_shards=1))["image_text"]["images"]
  (seen,) = shown
  np.testing.assert_array_equal(seen, pairs[:, ::-1])
  monkeypatch.setattr(decoding, "jitted", jitted)

  # VQA with the classifier head (a new parameter: initialised, reported) scored by its top class.
  answers = (tmp_path / "tfds" / "vqa_v2" / "shapes" / "1.0.0" / "answers.txt").read_text()
  answers = answers.splitlines()
  vqa = tmp_path / "vqa_classifier"
  stdout = _run(tmp_path, "simvlm_jax.train", "--gin_file=models/simvlm_tiny.gin",
                "--gin_file=finetune/vqa.gin", "--gin_file=finetune/vqa_classifier.gin",
                "--gin_file=runs/demo_finetune.gin", "--gin.TASK='shapes_vqa_v2'",
                f"--gin.NUM_ANSWER_CLASSES={len(answers)}", f"--gin.PRETRAINED_DIR='{pretrain}'",
                f"--gin.train.model_dir='{vqa}'", "--gin.train.total_steps=2",
                "--gin.BATCH_SIZE=4")
  report = next(line for line in stdout.splitlines() if line.startswith("initialised from"))
  assert "1 new" in report and "new: classifier/kernel" in stdout
  # Evaluated in this process (the command itself: the NLVR2 run above), as the controls are.
  for task in ("vqa_v2", "snli_ve"):
    here = registration.register_downstream(task, "shapes", data, name=f"eval_test_{task}")
    monkeypatch.setitem(registry, f"shapes_{task}", seqio.get_mixture_or_task(here))
  eval_command.evaluate(model_dir=str(vqa), task="shapes_vqa_v2", steps=[2])
  out_dir = vqa / "eval_shapes_vqa_v2_validation"
  scores = json.loads((out_dir / "scores.json").read_text())["2"]
  assert scores["method"] == "classifier"
  assert set(scores["per_answer_type"]) <= {"yes/no", "number", "other"}
  rows = _rows(out_dir, 2)
  assert len(rows) == scores["examples"] > 0
  assert all(r["prediction"] in answers for r in rows)
  _check_vqa(scores, rows)

  # predict on the finetuned runs, from their run directories alone: the classifier names an
  # answer of its own answers.txt; NLVR2 reads an image pair and needs its statement.
  photos = tmp_path / "photos"
  photos.mkdir()
  rng = np.random.default_rng(0)
  for name in ("left.png", "right.jpg"):
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), np.uint8)).save(photos / name)
  # (In this process: the command line itself is run on trained runs by test_demo_e2e.py and
  # test_own_data_e2e.py, and on a gs:// run below.)
  out, _, status = predict_here(checkpoint_dir=str(vqa), image=f"{photos}/left.png",
                                prompt="what colour is the circle?", format="json")
  predicted = json.loads(out)
  assert status == 0 and predicted["prediction"] in answers and 0.0 < predicted["score"] < 1.0
  assert (vqa / "answers.txt").read_text().splitlines() == answers
  out, _, status = predict_here(checkpoint_dir=str(finetuned), image=f"{photos}/left.png",
                               image2=f"{photos}/right.jpg", prompt="there is a red circle",
                               format="json", max_decode_length=4)
  pair = json.loads(out)
  assert status == 0 and pair["image2"] == f"{photos}/right.jpg"
  # The pair, the statement and the decoder's cache as the teacher-forced model without one has it.
  text, log_prob = _greedy_reference(finetuned, [photos / "left.png", photos / "right.jpg"],
                                     "there is a red circle", 4)
  assert pair["prediction"] == text and pair["score"] == pytest.approx(log_prob, abs=1e-4)
  # Refusals, through the command's function in this process (its wrapper prints "error: ..." and
  # exits 2: tests/test_fault_commands.py).
  for request, message in (({"prompt": "x"},
                            "this is an NLVR2 run: give the second image of each pair with "
                            "--image2"),
                           ({"image2": f"{photos}/right.jpg"},
                            "this is a nlvr2 run: give the statement about the image pair with "
                            "--prompt")):
    with pytest.raises(UserError, match=f"^{message}$"):
      predict_here(checkpoint_dir=str(finetuned), image=f"{photos}/left.png", **request)

  # Generative VQA and SNLI-VE: finetuning runs of their recipes (the decoder writes the answer,
  # the label) from the pretraining run, 30 steps: what it takes for their answers to be words
  # ("yes", "no", "large"; "neutral", "entailment", "entail") rather than EOS at once, so that the
  # scores below are more than 0 == 0. VQA takes SNLI-VE's TARGETS_LENGTH (10: "contradiction" is
  # 8 tokens and EOS) so that both runs compile one train step, and both evaluations (36 rows a
  # batch, 10 tokens) one decoder.
  raw = tmp_path / "raw"
  generative = {"vqa_v2": tmp_path / "vqa_generative", "snli_ve": tmp_path / "snli_ve"}
  for task, run in generative.items():
    _run(tmp_path, "simvlm_jax.train", "--gin_file=models/simvlm_tiny.gin",
         f"--gin_file=finetune/{'vqa' if task == 'vqa_v2' else task}.gin",
         "--gin_file=runs/demo_finetune.gin", f"--gin.TASK='shapes_{task}'",
         f"--gin.PRETRAINED_DIR='{pretrain}'", f"--gin.train.model_dir='{run}'",
         "--gin.train.total_steps=30", "--gin.BATCH_SIZE=4", "--gin.TARGETS_LENGTH=10")
    eval_command.evaluate(model_dir=str(run), task=f"shapes_{task}", steps=[30], batch_size=36)

  # VQA: every validation question once, as the prompt, with its ten human answers; each answer
  # decoded greedily and scored by the official accuracy (`_check_vqa`).
  out_dir = generative["vqa_v2"] / "eval_shapes_vqa_v2_validation"
  scores = json.loads((out_dir / "scores.json").read_text())["30"]
  rows = _rows(out_dir, 30)
  questions = {q["question_id"]: q["question"] for q in json.loads(
      (raw / "vqa_v2" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]}
  humans = {a["question_id"]: [h["answer"] for h in a["answers"]] for a in json.loads(
      (raw / "vqa_v2" / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]}
  assert scores["method"] == "greedy"
  assert sorted(r["question_id"] for r in rows) == sorted(questions)
  assert all(r["prompt"] == questions[r["question_id"]] and r["answers"] == humans[r["question_id"]]
             for r in rows)
  _check_vqa(scores, rows)
  assert len({round(r["score"]) for r in rows}) >= 3, [r["prediction"] for r in rows]
  # SNLI-VE: every validation pair once, its hypothesis the prompt (the image is the premise),
  # accuracy per class over the three labels (12 pairs each) and the confusion matrix.
  out_dir = generative["snli_ve"] / "eval_shapes_snli_ve_validation"
  scores = json.loads((out_dir / "scores.json").read_text())["30"]
  rows = _rows(out_dir, 30)
  pairs = {p["pairID"]: p for p in map(json.loads, (raw / "snli_ve" / "snli_ve_dev.jsonl")
                                       .read_text().splitlines())}
  assert scores["method"] == "greedy"
  assert sorted(r["pair_id"] for r in rows) == sorted(pairs)
  assert all(r["prompt"] == pairs[r["pair_id"]]["sentence2"]
             and r["targets_pretokenized"] == pairs[r["pair_id"]]["gold_label"] for r in rows)
  classes = ("entailment", "neutral", "contradiction")
  assert sorted(r["targets_pretokenized"] for r in rows) == sorted(classes * 12)
  _check_classification(scores, rows, classes)
  assert set(scores["per_class_accuracy"]) == set(classes)
  assert any(r["prediction"] in classes for r in rows), [r["prediction"] for r in rows]

  # predict on them: the prompt is the question (the hypothesis), the answer the greedy decoding
  # of the model written out (`_greedy_reference`), its score that decoding's log-probability; no
  # prompt is refused (before the parameters load).
  for task, prompt, role in (("vqa_v2", "what colour is the circle?", "the question"),
                             ("snli_ve", "there is a circle", "the hypothesis")):
    out, _, status = predict_here(checkpoint_dir=str(generative[task]), image=f"{photos}/left.png",
                                  prompt=prompt, format="json", max_decode_length=4)
    predicted = json.loads(out)
    assert status == 0 and predicted["prompt"] == prompt
    text, log_prob = _greedy_reference(generative[task], [photos / "left.png"], prompt, 4)
    assert predicted["prediction"] == text, (predicted, text)
    assert predicted["score"] == pytest.approx(log_prob, abs=1e-4) and log_prob < 0.0
    with pytest.raises(UserError, match=f"^this is a {task} run: give {role}"):
      predict_here(checkpoint_dir=str(generative[task]), image=f"{photos}/left.png")

  # Zero-shot captioning of the pretraining checkpoint, same command, beam search, with the run on
  # a gs:// bucket (served from a local folder by tests/fake_gcs.py: no network): eval and
  # predict read the run and write their results through epath alone.
  bucket = tmp_path / "bucket"
  shutil.copytree(pretrain, bucket / "b" / "pretrain")
  fake_gcs = [os.path.join(REPO, "tests", "fake_gcs.py"), str(bucket)]
  out = subprocess.run(
      [sys.executable, *fake_gcs, "simvlm_jax.eval", "--gin_file=gin/eval.gin",
       "--gin.evaluate.model_dir='gs://b/pretrain'", "--gin.evaluate.task='shapes_coco_captions'",
       "--gin.evaluate.max_decode_length=8", "--gin.evaluate.beam_size=2",
       # METEOR (a Java start-up, ~10 s) is covered by tests/test_metrics.py.
       "--gin.evaluate.caption_metric_names=('Bleu', 'ROUGE_L', 'CIDEr')"],
      cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
  # The quiet console: nothing but the project's own warning, once.
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stderr.splitlines() == [f"warning: {caption_metrics.SPICE_UNAVAILABLE}"]
  assert out.stdout.strip().endswith("-> gs://b/pretrain/eval_shapes_coco_captions_validation")
  out_dir = bucket / "b" / "pretrain" / "eval_shapes_coco_captions_validation"
  captions = json.loads((out_dir / "scores.json").read_text())["2"]
  assert {"Bleu_4", "ROUGE_L", "CIDEr"} <= set(captions) and "METEOR" not in captions
  assert captions["examples"] == 12 and captions["method"] == "beam"
  assert (out_dir / "report_2.html").exists()
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(out_dir))
  out = subprocess.run(
      [sys.executable, *fake_gcs, "simvlm_jax.predict", "--checkpoint_dir=gs://b/pretrain",
       f"--image={photos}/left.png", "--max_decode_length=4", "--format=json"],
      cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stderr == "", out.stderr[-3000:]
  assert json.loads(out.stdout)["prompt"] == "a picture of"
  assert not os.path.exists(os.path.join(REPO, "gs:"))  # nothing went to a local "gs:" folder
