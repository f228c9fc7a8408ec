"""The downstream readers on tiny fixtures written in exactly the official formats, their errors
when files are missing, the VQA answer vocabulary and scores, the SeqIO tasks and the CLI."""
import io
import json
import os

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds
from PIL import Image

import tasks  # noqa: F401  (registers everything)
from simvlm_jax.metrics import vqa as vqa_metrics
from tasks import build
from tasks.downstream import coco_karpathy, nlvr2, nocaps, registration, snli_ve, vqa_v2


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
  """Keeps the vocabulary cache of these tests out of the home directory."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("SIMVLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "simvlm_cache"))
    yield


def _image(path, seed: int) -> bytes:
  """Writes a tiny random image (JPEG or PNG by extension) and returns its bytes."""
  pixels = np.random.default_rng(seed).integers(0, 255, (12, 16, 3), np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="PNG" if str(path).endswith(".png") else "JPEG")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(out.getvalue())
  return out.getvalue()


def _json(path, data) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f)


def _jsonl(path, records) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def _read(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split, decoders={
      k: tfds.decode.SkipDecoding() for k, v in builder.info.features.items()
      if isinstance(v, tfds.features.Image)})))


def _coco_file(folder: str, cocoid: int) -> str:
  return f"COCO_{folder}_{cocoid:012d}.jpg"


def write_coco(root) -> dict:
  """dataset_coco.json (one image per Karpathy split, plus restval and a missing file) + images."""
  entries, data = [], {}
  for k, (split, folder) in enumerate([("train", "train2014"), ("restval", "val2014"),
                                       ("val", "val2014"), ("test", "val2014"),
                                       ("train", "train2014")]):
    cocoid = 391895 + k
    name = _coco_file(folder, cocoid)
    if k < 4:  # the last image is missing on disk: skipped, not fatal
      data[cocoid] = _image(root / folder / name, k)
    entries.append({"filepath": folder, "filename": name, "imgid": k, "split": split,
                    "cocoid": cocoid, "sentids": [10 * k, 10 * k + 1],
                    "sentences": [{"tokens": ["a", "man"], "raw": f"A man number {k}. ",
                                   "imgid": k, "sentid": 10 * k},
                                  {"tokens": ["a", "dog"], "raw": "A dog.", "imgid": k,
                                   "sentid": 10 * k + 1}]})
  _json(root / "dataset_coco.json", {"images": entries, "dataset": "coco"})
  return data


def test_coco_karpathy(tmp_path):
  data = write_coco(tmp_path / "coco")
  builder = coco_karpathy.CocoKarpathy(data_dir=str(tmp_path / "tfds"),
                                       source_dir=str(tmp_path / "coco"))
  builder.download_and_prepare()
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "train": 2, "validation": 1, "test": 1}  # train = train + restval
  train = _read(builder, "train")
  assert sorted(e["image_id"] for e in train) == [391895, 391896]
  for example in train:
    assert example["image"] == data[example["image_id"]]  # stored as read
    assert [c.decode() for c in example["captions"]] == [
        f"A man number {example['image_id'] - 391895}.", "A dog."]
  (test,) = _read(builder, "test")
  assert test["file_name"].decode() == "val2014/" + _coco_file("val2014", 391898)


def test_missing_files_name_what_is_expected_and_where_it_comes_from(tmp_path):
  builder = coco_karpathy.CocoKarpathy(data_dir=str(tmp_path / "tfds"),
                                       source_dir=str(tmp_path / "nothing"))
  with pytest.raises(FileNotFoundError) as error:
    builder.download_and_prepare()
  message = str(error.value)
  for expected in ("dataset_coco.json", "Karpathy", "neuraltalk", "train2014/", "val2014/",
                   "cocodataset.org", str(tmp_path / "nothing")):
    assert expected in message
  # A partial folder names only what is missing, and still lists everything expected.
  (tmp_path / "snli" / "flickr30k_images").mkdir(parents=True)
  _jsonl(tmp_path / "snli" / "snli_ve_train.jsonl", [])
  with pytest.raises(FileNotFoundError, match="missing snli_ve_dev.jsonl, snli_ve_test.jsonl in"):
    snli_ve.SnliVe(data_dir=str(tmp_path / "tfds"),
                   source_dir=str(tmp_path / "snli")).download_and_prepare()


def test_default_source_dir_comes_from_the_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("SIMVLM_DOWNSTREAM_DIR", str(tmp_path))
  assert nlvr2.Nlvr2(data_dir=str(tmp_path)).source_dir() == str(tmp_path / "nlvr2")
  assert nlvr2.Nlvr2(config="shapes", data_dir=str(tmp_path)).source_dir() == str(
      tmp_path / "shapes" / "nlvr2")
  text = snli_ve.SnliVe(config="shapes_text", data_dir=str(tmp_path))
  assert text.source_dir() == str(tmp_path / "shapes" / "text_nli")


def test_nocaps(tmp_path):
  root = tmp_path / "nocaps"
  images = [{"id": k, "file_name": f"{k:016x}.jpg", "open_images_id": f"{k:016x}",
             "height": 12, "width": 16, "domain": domain}
            for k, domain in enumerate(nocaps.DOMAINS)]
  data = {k: _image(root / "val" / image["file_name"], k) for k, image in enumerate(images)}
  annotations = [{"image_id": k % 3, "id": k, "caption": f"caption {k}"} for k in range(6)]
  _json(root / nocaps.VAL_FILE, {"licenses": [], "info": {}, "images": images,
                                 "annotations": annotations})
  builder = nocaps.Nocaps(data_dir=str(tmp_path / "tfds"), source_dir=str(root))
  builder.download_and_prepare()
  assert list(builder.info.splits) == ["validation"]  # no test file: no test split
  for example in _read(builder, "validation"):
    k = example["image_id"]
    assert example["image"] == data[k]
    assert nocaps.DOMAINS[example["domain"]] == images[k]["domain"]
    assert [c.decode() for c in example["captions"]] == [f"caption {k}", f"caption {k + 3}"]

  _json(root / nocaps.TEST_FILE, {"images": [dict(images[0], id=7, file_name="t.jpg")]})
  _image(root / "test" / "t.jpg", 9)
  builder = nocaps.Nocaps(data_dir=str(tmp_path / "tfds2"), source_dir=str(root))
  builder.download_and_prepare()
  (test,) = _read(builder, "test")
  assert test["image_id"] == 7 and len(test["captions"]) == 0


def _vqa_annotation(question_id, image_id, answers, answer_type="other"):
  return {"question_id": question_id, "image_id": image_id, "question_type": "what is",
          "answer_type": answer_type, "multiple_choice_answer": answers[0],
          "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                      for i, a in enumerate(answers)]}


def write_vqa(root, coco_root) -> None:
  """Two train and two val questions (COCO images in a sibling folder), and test-dev questions."""
  for subtype, image_ids in (("train2014", (1, 2)), ("val2014", (3,))):
    for image_id in image_ids:
      _image(coco_root / subtype / _coco_file(subtype, image_id), image_id)
  _image(coco_root / "test2015" / _coco_file("test2015", 5), 5)
  answers = {
      10: ["2"] * 7 + ["two", "3", "3"],
      11: ["Yes"] * 4 + ["yes"] * 6,
      20: ["red ball"] * 3 + ["red"] * 2 + ["blue"] + ["ball"] * 4,
      30: ["yes"] * 10,
  }
  image_of = {10: 1, 11: 1, 20: 2, 30: 3}
  for subtype, ids in (("train2014", (10, 11, 20)), ("val2014", (30,))):
    _json(root / f"v2_OpenEnded_mscoco_{subtype}_questions.json", {"questions": [
        {"image_id": image_of[q], "question": f"question {q}?", "question_id": q} for q in ids]})
    _json(root / f"v2_mscoco_{subtype}_annotations.json", {"annotations": [
        _vqa_annotation(q, image_of[q], answers[q]) for q in ids]})
  _json(root / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
        {"questions": [{"image_id": 5, "question": "test?", "question_id": 50}]})


def test_vqa_v2(tmp_path):
  write_vqa(tmp_path / "vqa_v2", tmp_path / "coco")
  builder = vqa_v2.VqaV2(data_dir=str(tmp_path / "tfds"), source_dir=str(tmp_path / "vqa_v2"),
                         min_answer_count=1)
  assert builder.image_dir() == str(tmp_path / "coco")  # the sibling folder of COCO images
  builder.download_and_prepare()
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "train": 3, "validation": 1, "test_dev": 1}
  # Normalised multiple_choice_answers over train + val, most frequent first.
  vocab = vqa_v2.load_answer_vocab(data_dir=str(tmp_path / "tfds"))
  assert vocab == ["yes", "2", "red ball"]
  assert os.path.exists(os.path.join(builder.data_dir, "answers.txt"))

  by_id = {e["question_id"]: e for e in _read(builder, "train")}
  first = by_id[10]
  assert [a.decode() for a in first["answers"]] == ["2"] * 7 + ["two", "3", "3"]
  assert first["multiple_choice_answer"] == b"2" and first["answer_type"] == b"other"
  # "two" and "3" are not in the vocabulary (or score nothing as "2"): only "2" is a target.
  assert first["answer_ids"].tolist() == [1]
  np.testing.assert_allclose(first["answer_scores"], [1.0])
  third = by_id[20]  # "red ball" x3: 0.9; "ball" and "red" are out of the vocabulary
  assert third["answer_ids"].tolist() == [2]
  np.testing.assert_allclose(third["answer_scores"], [0.9])
  (test,) = _read(builder, "test_dev")
  assert test["image_id"] == 5 and len(test["answers"]) == 0 and test["answer_type"] == b""

  top = vqa_v2.VqaV2(data_dir=str(tmp_path / "tfds_top"), source_dir=str(tmp_path / "vqa_v2"),
                     min_answer_count=1, max_answers=1)
  top.download_and_prepare()
  assert vqa_v2.load_answer_vocab(data_dir=str(tmp_path / "tfds_top")) == ["yes"]


def test_answer_scores_are_the_official_accuracy():
  cases = [["2"] * 7 + ["two", "3", "3"], ["yes"] * 10, ["Yes"] * 4 + ["yes"] * 6,
           ["red"] * 3 + ["dark red"] * 2 + ["blue"] * 5, ["a dog"] + ["dog."] * 2 + ["cat"] * 7,
           ["1,000"] * 2 + ["1000"] + ["one thousand"] * 7, ["ball"], ["Yes"] * 10,
           ["t-shirt"] * 10, ["dont"] * 3 + ["don't"] * 3 + ["no"] * 4,
           ["red"] * 2 + ["red "] * 2 + ["blue"] * 6]
  for answers in cases:
    for version in vqa_metrics.VERSIONS:
      scores = vqa_v2.answer_scores(answers, version)
      assert scores, answers
      for candidate, score in scores.items():
        assert score == pytest.approx(
            vqa_metrics.question_accuracy(candidate, answers, version)), (answers, version)
  # The default is the metric's: "2021" counts "a dog" and "dog." as "dog" (3 -> 0.9), "2016" only
  # the "dog." (2 -> 0.6).
  assert vqa_v2.answer_scores(["a dog"] + ["dog."] * 2 + ["cat"] * 7)["dog"] == pytest.approx(0.9)
  assert vqa_v2.answer_scores(["a dog"] + ["dog."] * 2 + ["cat"] * 7, "2016")["dog"] == \
      pytest.approx(0.6)
  assert vqa_v2.answer_scores(["2"] * 3 + ["3"] * 7) == pytest.approx({"2": 0.9, "3": 1.0})
  assert vqa_v2.answer_scores(["b"] + ["c"] * 2 + ["d"] * 7) == pytest.approx(
      {"b": 0.3, "c": 0.6, "d": 1.0})


def test_answer_vocabulary_recipe():
  assert vqa_v2.normalize_answer("Two dogs!") == "2 dogs"
  assert vqa_v2.normalize_answer("the 1,000") == "1000"
  annotations = [{"multiple_choice_answer": a}
                 for a in ["yes"] * 9 + ["Yes."] * 2 + ["no"] * 9 + ["two"] * 5 + ["2"] * 4 +
                 ["cat"] * 8]
  assert vqa_v2.build_answer_vocab(annotations) == ["yes", "2", "no"]
  assert vqa_v2.build_answer_vocab(annotations, min_count=1) == ["yes", "2", "no", "cat"]
  assert vqa_v2.build_answer_vocab(annotations, min_count=1, max_answers=2) == ["yes", "2"]


def write_nlvr2(root, top_level_images: bool = False) -> dict:
  """train.json (with directories), dev.json and test1.json, and their image pairs."""
  images = root if top_level_images else root / "images"
  data = {}
  for split in ("train", "dev", "test1"):
    records = []
    for k in range(2):
      identifier = f"{split}-{k}-0-{k}"
      record = {"identifier": identifier, "sentence": f"{split} sentence {k}",
                "label": "True" if k == 0 else "False", "synset": "dog", "query": "dogs"}
      folder = images / split
      if split == "train":
        record["directory"] = str(7 + k)
        folder = folder / record["directory"]
      left, right = nlvr2.image_names(identifier)
      data[identifier] = (_image(folder / left, 2 * k), _image(folder / right, 2 * k + 1))
      records.append(record)
    _jsonl(root / f"{split}.json", records)
  return data


@pytest.mark.parametrize("top_level_images", [False, True])
def test_nlvr2(tmp_path, top_level_images):
  assert nlvr2.image_names("dev-850-0-0") == ("dev-850-0-img0.png", "dev-850-0-img1.png")
  data = write_nlvr2(tmp_path / "nlvr2", top_level_images)
  builder = nlvr2.Nlvr2(data_dir=str(tmp_path / "tfds"), source_dir=str(tmp_path / "nlvr2"))
  builder.download_and_prepare()
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "train": 2, "validation": 2, "test": 2}
  for split, name in nlvr2.SPLITS.items():
    for example in _read(builder, split):
      identifier = example["identifier"].decode()
      assert identifier.startswith(name)
      assert (example["image_left"], example["image_right"]) == data[identifier]
      assert example["label"] == identifier.endswith("-0")
      assert example["sentence"].decode() == f"{name} sentence {identifier[-1]}"


def write_snli_ve(root) -> dict:
  data = {}
  for split in ("train", "dev", "test"):
    records = []
    for k, label in enumerate(snli_ve.LABELS + ("-",)):
      flickr_id = f"{1000092795 + k}"
      data[flickr_id] = _image(root / "flickr30k_images" / f"{flickr_id}.jpg", k)
      records.append({"Flickr30K_ID": flickr_id, "annotator_labels": [label],
                      "captionID": f"{flickr_id}.jpg#0", "gold_label": label,
                      "pairID": f"{flickr_id}.jpg#0r1{label[0]}",
                      "sentence1": f"premise {k}", "sentence2": f"{split} hypothesis {k}"})
    _jsonl(root / f"snli_ve_{split}.jsonl", records)
  return data


def test_snli_ve_and_its_text_form(tmp_path):
  data = write_snli_ve(tmp_path / "snli_ve")
  builder = snli_ve.SnliVe(data_dir=str(tmp_path / "tfds"), source_dir=str(tmp_path / "snli_ve"))
  builder.download_and_prepare()
  # The "-" (no gold label) line of each split is skipped.
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "train": 3, "validation": 3, "test": 3}
  for example in _read(builder, "validation"):
    k = int(example["hypothesis"].decode().split()[-1])
    assert example["hypothesis"].decode() == f"dev hypothesis {k}"
    assert snli_ve.LABELS[example["label"]] == snli_ve.LABELS[k]
    assert example["premise_text"].decode() == f"premise {k}"
    assert example["image"] == data[example["flickr30k_id"].decode()]

  # The text form needs no images.
  for name in os.listdir(tmp_path / "snli_ve" / "flickr30k_images"):
    os.remove(tmp_path / "snli_ve" / "flickr30k_images" / name)
  os.rmdir(tmp_path / "snli_ve" / "flickr30k_images")
  text = snli_ve.SnliVe(config="official_text", data_dir=str(tmp_path / "tfds"),
                        source_dir=str(tmp_path / "snli_ve"))
  text.download_and_prepare()
  examples = _read(text, "train")
  assert len(examples) == 3 and "image" not in examples[0]
  assert {e["premise_text"].decode() for e in examples} == {"premise 0", "premise 1", "premise 2"}


def test_seqio_tasks_carry_text_tokens_and_metric_fields(tmp_path):
  write_vqa(tmp_path / "vqa_v2", tmp_path / "coco")
  write_nlvr2(tmp_path / "nlvr2")
  write_snli_ve(tmp_path / "snli_ve")
  data_dir = str(tmp_path / "tfds")
  build.main(["--data_dir", data_dir, "downstream", "--source_dir", str(tmp_path),
              "--min_answer_count", "1"])
  # Only the benchmarks whose folders exist are built (coco/ holds only VQA's images).
  built = set(os.listdir(data_dir))
  assert {"vqa_v2", "nlvr2", "snli_ve"} <= built and not {"coco_karpathy", "nocaps"} & built

  def first(benchmark, split):
    name = registration.register_downstream(benchmark, data_dir=data_dir,
                                            name=f"readers_test_{benchmark}")
    task = seqio.get_mixture_or_task(name)
    return next(iter(task.get_dataset(sequence_length=None, split=split, shuffle=False)
                     .as_numpy_iterator()))

  vocab = tasks.VOCABULARY
  vqa = first("vqa_v2", "validation")
  assert isinstance(vqa["image"], bytes)
  assert vocab.decode(vqa["inputs"].tolist()) == "question 30?"
  assert vocab.decode(vqa["targets"].tolist()) == "yes"
  assert vqa["targets_pretokenized"] == b"yes" and vqa["answer_type"] == b"other"
  assert len(vqa["answers"]) == 10 and vqa["answer_ids"].tolist() == [0]

  pair = first("nlvr2", "validation")  # TFDS stores examples in a shuffled order
  assert isinstance(pair["image_left"], bytes) and isinstance(pair["image_right"], bytes)
  assert pair["label"] == pair["identifier"].endswith(b"-0")
  assert vocab.decode(pair["targets"].tolist()) == ("true" if pair["label"] else "false")

  nli = first("snli_ve", "test")
  k = int(nli["inputs_pretokenized"].split()[-1])
  assert nli["targets_pretokenized"].decode() == snli_ve.LABELS[k] and nli["label"] == k
  # With the image as premise, the text premise rides along untokenized (no model input).
  assert nli["premise_text"] == f"premise {k}".encode() and "premise" not in nli
  text = first("snli_ve_text", "test")
  k = int(text["inputs_pretokenized"].split()[-1])
  assert vocab.decode(text["premise"].tolist()) == f"premise {k}" and "image" not in text


def test_task_metric_fns_are_the_official_metrics(tmp_path):
  """The tasks' seqio metric_fns and postprocess_fn, applied as seqio's evaluator applies them
  (targets: postprocess_fn(targets_pretokenized, example=ex, is_target=True)): the metric gets
  the human answers / every reference, and scores a perfect or a wrong model as expected."""
  write_vqa(tmp_path / "vqa_v2", tmp_path / "coco")
  write_coco(tmp_path / "coco")
  write_nlvr2(tmp_path / "nlvr2")
  write_snli_ve(tmp_path / "snli_ve")
  data_dir = str(tmp_path / "tfds")
  build.main(["--data_dir", data_dir, "downstream", "--source_dir", str(tmp_path),
              "--min_answer_count", "1"])

  def evaluate(benchmark, answer=None):
    """Metrics of a model that predicts the target text ("perfect") or always `answer`."""
    name = registration.register_downstream(benchmark, data_dir=data_dir,
                                            name=f"metric_fns_test_{benchmark}")
    task = seqio.get_mixture_or_task(name)
    examples = list(task.get_dataset(sequence_length=None, split="validation",
                                     shuffle=False).as_numpy_iterator())
    targets = [task.postprocess_fn(ex["targets_pretokenized"], example=ex, is_target=True)
               for ex in examples]
    predictions = [task.postprocess_fn(answer or ex["targets_pretokenized"].decode(),
                                       example=ex, is_target=False) for ex in examples]
    (metric_fn,) = task.metric_fns
    return targets, metric_fn(targets, predictions)

  # Validation question 30: ten humans answered "yes".
  targets, scores = evaluate("vqa_v2")
  assert [list(t["answers"]) for t in targets] == [[b"yes"] * 10]
  assert scores == {"vqa_accuracy": 100.0, "vqa_accuracy_other": 100.0}
  assert evaluate("vqa_v2", answer="no")[1]["vqa_accuracy"] == 0.0
  _, nlvr2_scores = evaluate("nlvr2")
  assert nlvr2_scores["accuracy"] == 100.0 and nlvr2_scores["confusion/true->true"] == 1.0
  assert evaluate("nlvr2", answer="maybe")[1]["confusion/false-><other>"] == 1.0
  assert evaluate("snli_ve")[1]["accuracy"] == 100.0
  assert evaluate("snli_ve", answer="neutral")[1]["accuracy"] == pytest.approx(100 / 3)
  # The validation image's two references; predicting one of them gives BLEU-1 = 1.
  targets, captions = evaluate("coco_captions")
  assert targets == [[b"A man number 2.", b"A dog."]]
  assert captions["Bleu_1"] == pytest.approx(1.0) and "CIDEr" in captions
  assert evaluate("coco_captions", answer="zebra")[1]["Bleu_1"] < 1e-6


def test_task_vqa_metric_version(tmp_path):
  targets = [{"answers": np.array([b"yes"] * 10), "answer_type": b"yes/no"}]
  default = registration.register_downstream("vqa_v2", data_dir=str(tmp_path),
                                             name="metric_version_test_default")
  (metric_fn,) = seqio.get_mixture_or_task(default).metric_fns
  # "2021": ten identical answers, so "Yes" is compared as it is: 0.
  assert metric_fn(targets, ["Yes"])["vqa_accuracy"] == 0.0
  legacy = registration.register_downstream("vqa_v2", data_dir=str(tmp_path),
                                            name="metric_version_test_legacy",
                                            vqa_metric_version="legacy")
  (metric_fn,) = seqio.get_mixture_or_task(legacy).metric_fns
  assert metric_fn(targets, ["Yes"])["vqa_accuracy"] == 100.0  # "2016": "Yes" -> "yes"
  with pytest.raises(ValueError, match="name of its own"):  # "vqa_v2" means the default metric
    registration.register_downstream("vqa_v2", vqa_metric_version="2016")
  with pytest.raises(ValueError, match="for vqa_v2"):
    registration.register_downstream("nlvr2", name="x", vqa_metric_version="2016")
  with pytest.raises(ValueError, match="unknown VQA metric version"):
    registration.register_downstream("vqa_v2", name="x", vqa_metric_version="2017")
