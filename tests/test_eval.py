"""The eval command: task -> metric dispatch with hand-computed scores, and (slow) the whole path:
pretrain a tiny model, finetune it with init_from, evaluate with the official metrics."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import seqio
from PIL import Image
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

from simvlm_jax import eval as eval_command
from simvlm_jax import evaluators as eval_lib
from simvlm_jax.data import finetune
from simvlm_jax.errors import UserError
from simvlm_jax.metrics import captions as caption_metrics
from simvlm_jax.metrics import vqa as vqa_metrics
from tasks import build
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
  scores, _ = eval_lib.score("coco_captions", ["a large red circle", "a small blue square",
                                               "a small cross"], meta, caption_metric_names=("CIDEr",))
  assert scores["caption_correctness"] == {"precision": pytest.approx(50.0),
                                           "recall": pytest.approx(100 * 1 / 3), "right": 50.0,
                                           "captions": 2, "claims": 6}
  assert eval_lib._numeric(scores)["caption_correctness/recall"] == pytest.approx(100 / 3)
  plain, _ = eval_lib.score("coco_captions", ["a large red circle"],
                            [{"captions": np.array([b"a large red circle"])}],
                            caption_metric_names=("CIDEr",))
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
  flat = eval_lib._numeric({"accuracy": 1, "per": {"a": 2.0}, "method": "beam", "x": None,
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
  assert {"accuracy", "per_class_accuracy", "confusion_matrix"} <= set(scores["2"])
  assert 0.0 <= scores["2"]["accuracy"] <= 100.0 and scores["2"]["method"] == "greedy"
  rows = [json.loads(line) for line in (out_dir / "predictions_2.jsonl").read_text().splitlines()]
  assert len(rows) == scores["2"]["examples"] == 12  # 6 image pairs x 2 statements
  assert all(set(r) >= {"prompt", "prediction", "targets_pretokenized", "identifier", "score"}
             for r in rows)
  html = (out_dir / "report_2.html").read_text()
  assert html.count('<tr id="example-') == 12 and "data:image/jpeg;base64" in html
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(out_dir))
  # The control with each pair reversed (in this process, "shapes_nlvr2" reading this test's
  # data): the model is shown exactly that, and the scores go beside the real ones.
  here = registration.register_downstream("nlvr2", "shapes", data, name="eval_test_nlvr2")
  registry = seqio.TaskRegistry._REGISTRY  # pylint: disable=protected-access
  monkeypatch.setitem(registry, "shapes_nlvr2", seqio.get_mixture_or_task(here))
  shown, decode_fn = [], eval_lib._decode_fn  # pylint: disable=protected-access

  def recording_decode_fn(*args, **kwargs):
    decode = decode_fn(*args, **kwargs)
    return lambda params, images, prefix: (shown.append(np.asarray(images)),
                                           decode(params, images, prefix))[1]
  monkeypatch.setattr(eval_lib, "_decode_fn", recording_decode_fn)
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
  _run(tmp_path, "simvlm_jax.eval", "--gin_file=gin/eval.gin",
       f"--gin.evaluate.model_dir='{vqa}'", "--gin.evaluate.task='shapes_vqa_v2'")
  out_dir = vqa / "eval_shapes_vqa_v2_validation"
  scores = json.loads((out_dir / "scores.json").read_text())["2"]
  assert scores["method"] == "classifier" and 0.0 <= scores["accuracy"] <= 100.0
  assert set(scores["per_answer_type"]) <= {"yes/no", "number", "other"}
  rows = [json.loads(line) for line in (out_dir / "predictions_2.jsonl").read_text().splitlines()]
  assert len(rows) == scores["examples"] > 0
  assert all(r["prediction"] in answers for r in rows)
  # Each row's score is the official accuracy of its answer against the 10 human answers.
  for r in rows:
    assert r["score"] == pytest.approx(100 * vqa_metrics.question_accuracy(r["prediction"],
                                                                            r["answers"]))

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
                               format="json")
  pair = json.loads(out)
  assert status == 0 and pair["image2"] == f"{photos}/right.jpg"
  assert isinstance(pair["prediction"], str)
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

  # Generative VQA and SNLI-VE runs: predict answers the question (the hypothesis), and refuses
  # without one (before loading the parameters). They are copies of the generative NLVR2 run
  # whose config.gin names the task (predict reads the task from there; the model is the same,
  # and training each would cost half a minute of `make test`).
  runs = {}
  for task in ("vqa_v2", "snli_ve"):
    runs[task] = tmp_path / f"shapes_{task}"
    shutil.copytree(finetuned, runs[task])
    config = (runs[task] / "config.gin").read_text()
    assert "TASK = 'shapes_nlvr2'" in config
    (runs[task] / "config.gin").write_text(config.replace("TASK = 'shapes_nlvr2'",
                                                          f"TASK = 'shapes_{task}'"))
  for run, task, prompt, role in ((runs["vqa_v2"], "vqa_v2", "what colour is the circle?",
                                   "the question"),
                                  (runs["snli_ve"], "snli_ve", "there is a circle",
                                   "the hypothesis")):
    out, _, status = predict_here(checkpoint_dir=str(run), image=f"{photos}/left.png",
                                  prompt=prompt, format="json", max_decode_length=3)
    predicted = json.loads(out)
    assert status == 0 and predicted["prompt"] == prompt
    assert isinstance(predicted["prediction"], str)
    assert predicted["score"] < 0.0  # a sequence log-probability: a generative run
    with pytest.raises(UserError, match=f"^this is a {task} run: give {role}"):
      predict_here(checkpoint_dir=str(run), image=f"{photos}/left.png")

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
