"""Finetuning batches of the downstream tasks, on a tiny shapes-world build: shapes, dtypes and
contents (prefix without EOS, EOS-terminated targets, image pairs, VQA soft scores, premise +
hypothesis for text-only NLI), eval padding and pass-through features, resumable position."""
import io
import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

import tasks  # noqa: F401  (registers the builders)
from simvlm_jax.data import finetune, image_ops
from tasks import build
from tasks.downstream import registration, vqa_v2

TRAIN, EVAL = 40, 12
SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """The shapes benchmarks, built in a temporary directory and registered under test names."""
  out_dir = str(tmp_path_factory.mktemp("ft_raw"))
  data_dir = str(tmp_path_factory.mktemp("ft_tfds"))
  build.main(["--data_dir", data_dir, "shapes_downstream", "--out_dir", out_dir,
              "--train", str(TRAIN), "--eval", str(EVAL), "--workers", "0"])
  names = {b: registration.register_downstream(b, "shapes", data_dir, name=f"ft_test_{b}")
           for b in ("vqa_v2", "nlvr2", "snli_ve", "snli_ve_text", "coco_captions")}
  return names, data_dir


def _iterator(name, **kwargs):
  args = dict(batch_size=4, inputs_length=24, targets_length=10, image_size=SIZE, seed=0,
              shard_index=0, num_shards=1)
  return finetune.make_finetune_iterator(name, **{**args, **kwargs})


def _eval_rows(name, **kwargs):
  """Every row of one eval pass: (sub-batch rows, meta rows), padding removed."""
  subs, metas = [], []
  for batch in _iterator(name, split="validation", train=False, **kwargs):
    meta = batch.pop("meta")
    (sub,) = batch.values()
    valid = meta.pop("valid")
    subs.append({k: v[valid] for k, v in sub.items()})
    metas.append({k: v[valid] for k, v in meta.items()})
  return ({k: np.concatenate([s[k] for s in subs]) for k in subs[0]},
          {k: np.concatenate([m[k] for m in metas]) for k in metas[0]})


def _vocab(name):
  return finetune.vocabulary(name)


def _check_tokens(sub, vocab, prefix_length, target_length):
  assert sub["prefix_tokens"].dtype == np.int32 and sub["prefix_tokens"].shape[1] == prefix_length
  assert sub["target_tokens"].dtype == np.int32 and sub["target_tokens"].shape[1] == target_length
  assert not np.any(sub["prefix_tokens"] == 1), "the prefix must not end in EOS"
  assert np.all(sub["prefix_tokens"][:, 0] > 0)
  for row in sub["target_tokens"]:
    n = int(np.sum(row > 0))
    assert n >= 2 and row[n - 1] == 1 and not np.any(row[:n - 1] == 1) and not np.any(row[n:])


def test_vqa_generative_batches(data):
  names, _ = data
  batch = next(_iterator(names["vqa_v2"]))
  assert set(batch) == {"image_text"}
  sub = batch["image_text"]
  assert sub["images"].shape == (4, SIZE, SIZE, 3) and sub["images"].dtype == np.uint8
  _check_tokens(sub, _vocab(names["vqa_v2"]), 24, 10)

  rows, meta = _eval_rows(names["vqa_v2"])
  vocab = _vocab(names["vqa_v2"])
  for prefix, target, question, answer in zip(rows["prefix_tokens"], rows["target_tokens"],
                                              meta["inputs_pretokenized"],
                                              meta["targets_pretokenized"]):
    assert vocab.decode([int(t) for t in prefix if t]) == question.decode()
    assert vocab.decode([int(t) for t in target if t > 1]) == answer.decode()
  assert meta["answers"].shape[1] == 10 and set(meta["answer_type"]) <= {b"yes/no", b"number",
                                                                          b"other"}


def test_vqa_class_scores(data):
  names, data_dir = data
  answers = vqa_v2.load_answer_vocab("shapes", data_dir)
  classes = len(answers) + 3
  rows, meta = _eval_rows(names["vqa_v2"], classifier_classes=classes)
  assert "target_tokens" not in rows
  scores = rows["class_scores"]
  assert scores.dtype == np.float32 and scores.shape[1] == classes
  raw = list(tfds.as_numpy(tfds.builder("vqa_v2/shapes", data_dir=data_dir).as_dataset(
      split="validation", decoders={"image": tfds.decode.SkipDecoding()})))
  by_id = {ex["question_id"]: ex for ex in raw}
  assert len(scores) == len(raw)
  for row, question_id in zip(scores, meta["question_id"]):
    ex = by_id[question_id]
    expected = np.zeros(classes, np.float32)
    expected[ex["answer_ids"]] = ex["answer_scores"]
    np.testing.assert_allclose(row, expected)
    answer = ex["multiple_choice_answer"].decode()
    if answer in answers:  # the canonical answer is given by >= 4 humans: full score
      assert row[answers.index(answer)] == 1.0 and np.argmax(row) == answers.index(answer)
  # Fewer classes than answers: ids past the head are left out, nothing breaks.
  small = next(_iterator(names["vqa_v2"], classifier_classes=2))["image_text"]["class_scores"]
  assert small.shape == (4, 2) and np.all((small >= 0) & (small <= 1))


def test_nlvr2_image_pairs(data):
  names, data_dir = data
  rows, meta = _eval_rows(names["nlvr2"])
  assert rows["images"].shape[1:] == (2, SIZE, SIZE, 3) and rows["images"].dtype == np.uint8
  raw = {ex["identifier"]: ex for ex in tfds.as_numpy(tfds.builder(
      "nlvr2/shapes", data_dir=data_dir).as_dataset(
          split="validation", decoders={"image_left": tfds.decode.SkipDecoding(),
                                        "image_right": tfds.decode.SkipDecoding()}))}
  for images, identifier, target in zip(rows["images"], meta["identifier"],
                                        meta["targets_pretokenized"]):
    ex = raw[identifier]
    for side, name in enumerate(("image_left", "image_right")):
      expected = image_ops.crop_and_resize(image_ops.decode_rgb(tf.constant(ex[name])),
                                           (SIZE, SIZE)).numpy()
      np.testing.assert_array_equal(images[side], expected)
    assert target.decode() == ("true" if ex["label"] else "false")
  assert not np.array_equal(rows["images"][:, 0], rows["images"][:, 1])
  train = next(_iterator(names["nlvr2"]))["image_text"]
  assert train["images"].shape == (4, 2, SIZE, SIZE, 3)


def test_text_only_nli_prefix_is_premise_then_hypothesis(data):
  names, _ = data
  vocab = _vocab(names["snli_ve_text"])
  batch = next(_iterator(names["snli_ve_text"], inputs_length=100))
  assert set(batch) == {"text"} and "images" not in batch["text"]
  rows, meta = _eval_rows(names["snli_ve_text"], inputs_length=100)
  for prefix, premise, hypothesis in zip(rows["prefix_tokens"], meta["premise_pretokenized"],
                                         meta["inputs_pretokenized"]):
    expected = vocab.encode(premise.decode()) + vocab.encode(hypothesis.decode())
    assert [int(t) for t in prefix if t] == expected
  # Too long: the premise is cut, the hypothesis stays whole at the end.
  short, meta = _eval_rows(names["snli_ve_text"], inputs_length=20)
  cut = 0
  for prefix, premise, hypothesis in zip(short["prefix_tokens"], meta["premise_pretokenized"],
                                         meta["inputs_pretokenized"]):
    ids = vocab.encode(hypothesis.decode())
    premise_ids = vocab.encode(premise.decode())
    assert [int(t) for t in prefix if t] == premise_ids[:20 - len(ids)] + ids
    cut += len(premise_ids) + len(ids) > 20
  assert cut > 0
  # With images (SNLI-VE) the image is the premise: the prefix is the hypothesis alone.
  rows, meta = _eval_rows(names["snli_ve"])
  assert rows["images"].shape[1:] == (SIZE, SIZE, 3)
  for prefix, hypothesis in zip(rows["prefix_tokens"], meta["inputs_pretokenized"]):
    assert [int(t) for t in prefix if t] == vocab.encode(hypothesis.decode())


def test_caption_eval_pass_is_padded_and_complete(data):
  names, _ = data
  batches = list(_iterator(names["coco_captions"], batch_size=5, split="validation", train=False,
                           targets_length=32))
  valid = np.concatenate([b["meta"]["valid"] for b in batches])
  assert valid.sum() == EVAL and len(valid) == 5 * len(batches) and not valid[-1]
  last = batches[-1]
  assert last["image_text"]["images"].shape == (5, SIZE, SIZE, 3)
  assert not np.any(last["image_text"]["prefix_tokens"][~last["meta"]["valid"]])
  vocab = _vocab(names["coco_captions"])
  sub = batches[0]["image_text"]
  _check_tokens(sub, vocab, 24, 32)
  assert {vocab.decode([int(t) for t in p if t]) for p in sub["prefix_tokens"]} == {
      registration.CAPTION_PROMPT}
  assert batches[0]["meta"]["captions"].shape == (5, 5)


def test_train_stream_resumes_exactly(data, tmp_path):
  names, _ = data
  it = _iterator(names["snli_ve"])
  next(it)
  it.save(str(tmp_path / "pos"))
  expected = next(it)
  again = _iterator(names["snli_ve"])
  again.restore(str(tmp_path / "pos"))
  got = next(again)
  for k in expected["image_text"]:
    np.testing.assert_array_equal(got["image_text"][k], expected["image_text"][k])
  assert set(again.counters()) == {f"dropped/{d}" for d in finetune.DROPS}


def test_errors(data):
  names, _ = data
  with pytest.raises(ValueError, match="answer_ids"):
    _iterator(names["nlvr2"], classifier_classes=3)
  with pytest.raises(ValueError, match="no split"):
    _iterator(names["vqa_v2"], split="compositional")


def _write_vqa_with_bad_inputs(root):
  """Official VQA v2 files where some inputs cannot be used: an image that is not a JPEG, a cut
  JPEG, an empty question and an empty answer, next to two good questions."""
  jpeg = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), np.uint8)).save(
      jpeg, format="JPEG")
  images = {("train2014", 1): jpeg.getvalue(), ("train2014", 2): b"not an image at all",
            ("train2014", 3): jpeg.getvalue()[:200], ("val2014", 4): jpeg.getvalue()}
  for (folder, image_id), data in images.items():
    path = root / "coco" / folder / f"COCO_{folder}_{image_id:012d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
  # question id: (image, question, answer)
  questions = {"train2014": {10: (1, "what shape is it?", "circle"), 11: (1, "", "circle"),
                             12: (1, "what colour is it?", ""), 13: (1, "is it red?", "yes"),
                             20: (2, "what is this?", "square"), 30: (3, "how many?", "2")},
               "val2014": {40: (4, "what shape is it?", "circle")}}
  for folder, items in questions.items():
    (root / "vqa_v2").mkdir(parents=True, exist_ok=True)
    (root / "vqa_v2" / f"v2_OpenEnded_mscoco_{folder}_questions.json").write_text(json.dumps(
        {"questions": [{"image_id": i, "question": q, "question_id": k}
                       for k, (i, q, _) in items.items()]}))
    (root / "vqa_v2" / f"v2_mscoco_{folder}_annotations.json").write_text(json.dumps(
        {"annotations": [{"question_id": k, "image_id": i, "question_type": "what",
                          "answer_type": "other", "multiple_choice_answer": a,
                          "answers": [{"answer": a, "answer_confidence": "yes",
                                       "answer_id": j + 1} for j in range(10)]}
                         for k, (i, _, a) in items.items()]}))


def test_bad_inputs_are_dropped_and_counted(tmp_path, monkeypatch):
  monkeypatch.setenv("SIMVLM_CACHE_DIR", str(tmp_path / "cache"))
  _write_vqa_with_bad_inputs(tmp_path / "raw")
  data_dir = str(tmp_path / "tfds")
  build.main(["--data_dir", data_dir, "downstream", "--source_dir", str(tmp_path / "raw"),
              "--min_answer_count", "1"])
  name = registration.register_downstream("vqa_v2", data_dir=data_dir, name="ft_test_bad_vqa")
  # One eval pass: the two bad images and the empty question are dropped and counted; an empty
  # answer is kept (the question is still asked and scored).
  it = _iterator(name, split="train", train=False)
  questions = sorted(q for b in it for q, ok in zip(b["meta"]["question_id"], b["meta"]["valid"])
                     if ok)
  assert questions == [10, 12, 13]
  assert it.counters() == {"dropped/bad_image": 2, "dropped/empty_prefix": 1,
                           "dropped/empty_target": 0}
  # Training never stops on them: an endless stream of the good rows (an empty answer is no
  # target), every drop counted. (seqio shuffles across epochs, so the counts are not per epoch.)
  train = _iterator(name, batch_size=2)
  vocab = _vocab(name)
  seen, history = set(), []
  for _ in range(12):
    for prefix in next(train)["image_text"]["prefix_tokens"]:
      seen.add(vocab.decode([int(t) for t in prefix if t]))
    history.append(train.counters())
  assert seen == {"what shape is it?", "is it red?"}
  for key in ("bad_image", "empty_prefix", "empty_target"):
    counts = [h[f"dropped/{key}"] for h in history]
    assert counts == sorted(counts) and counts[-1] >= 2, (key, counts)
  # 24 good rows: the two bad images come as often as the two good questions, on average.
  assert 12 <= history[-1]["dropped/bad_image"] <= 48
