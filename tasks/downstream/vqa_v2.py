"""TFDS builder `vqa_v2`: VQA v2 questions with their ten human answers, the answer vocabulary
and the soft scores a classifier trains on.

Raw files (source_dir, default $SIMVLM_DOWNSTREAM_DIR/vqa_v2), from visualqa.org/download.html:
  v2_OpenEnded_mscoco_{train2014,val2014}_questions.json   {"questions": [{"image_id", "question",
                                                            "question_id"}, ...]}
  v2_mscoco_{train2014,val2014}_annotations.json            {"annotations": [{"question_id",
      "image_id", "question_type", "answer_type", "multiple_choice_answer",
      "answers": [{"answer", "answer_confidence", "answer_id"} x 10]}, ...]}
  v2_OpenEnded_mscoco_{test-dev2015,test2015}_questions.json   (optional, no answers)
COCO images (image_dir; default: source_dir if it holds train2014/, else the sibling coco/ folder):
  train2014/COCO_train2014_%012d.jpg, val2014/COCO_val2014_%012d.jpg,
  test2015/COCO_test2015_%012d.jpg

Splits: train, validation, and test_dev / test if their question files are there.
Features: image, image_id, question_id, question, question_type, answer_type ("yes/no", "number",
"other"; "" for test), multiple_choice_answer, answers (the ten raw human answers), answer_ids and
answer_scores (the classifier target: every human answer that is in the answer vocabulary and
scores above 0, with its VQA score; see `answer_scores`).

Answer vocabulary (the literature's 3,129 answers, the bottom-up-attention recipe): normalise each
question's multiple_choice_answer with the official VQA normalisation (`normalize_answer`), count
over train + val, keep the answers seen at least `min_answer_count` (9) times, most frequent first.
On the real data that gives 3,129 answers. `max_answers` optionally keeps only the top k instead.
The list is written to `answers.txt` in the built dataset's directory (line i = class i) and read
back with `load_answer_vocab`.
"""
import collections
import os
from typing import Iterable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simvlm_jax.data import paths
from simvlm_jax.metrics import vqa as vqa_metrics
from tasks.downstream import common

ANSWER_VOCAB_FILE = "answers.txt"
# split: (file stem, image folder, has annotations)
_SPLITS = {
    "train": ("train2014", "train2014", True),
    "validation": ("val2014", "val2014", True),
    "test_dev": ("test-dev2015", "test2015", False),
    "test": ("test2015", "test2015", False),
}


def _questions_file(stem: str) -> str:
  return f"v2_OpenEnded_mscoco_{stem}_questions.json"


def _annotations_file(stem: str) -> str:
  return f"v2_mscoco_{stem}_annotations.json"


EXPECTED = {
    **{_questions_file(s): "VQA v2 questions, from visualqa.org/download.html"
       for s in ("train2014", "val2014")},
    **{_annotations_file(s): "VQA v2 annotations, from visualqa.org/download.html"
       for s in ("train2014", "val2014")},
}
OPTIONAL = {_questions_file(s): "VQA v2 test questions (optional), from visualqa.org"
            for s in ("test-dev2015", "test2015")}
EXPECTED_IMAGES = {
    "train2014/": "COCO 2014 train images, from cocodataset.org",
    "val2014/": "COCO 2014 val images, from cocodataset.org",
}


def normalize_answer(answer: str) -> str:
  """The official VQA normalisation of an answer (`simvlm_jax.metrics.vqa`), plus the recipe's
  removal of remaining commas: the form answers take in the vocabulary."""
  return vqa_metrics.normalize_prediction(answer).replace(",", "")


def answer_scores(answers: Sequence[str],
                  version: str = vqa_metrics.DEFAULT_VERSION) -> dict[str, float]:
  """{normalised answer: the official VQA accuracy of predicting it} for each distinct human answer.

  That is `simvlm_jax.metrics.vqa.question_accuracy(candidate, answers, version)` (a test holds
  them equal): the mean over the leave-one-annotator-out subsets of min(1, matches / 3), i.e. 0.3,
  0.6, 0.9, 1.0 for an answer 1, 2, 3, 4+ of ten humans gave. So a classifier trained on these
  scores is trained on the metric (`version`: the metric's, default its current "2021"). Computed
  here with the human answers processed once, which the metric's per-prediction form would repeat
  for every candidate (minutes on the real data).
  """
  processed, normalise = vqa_metrics.process_answers(answers, version)
  counts = collections.Counter(processed)
  total = len(processed)
  scores = {}
  for candidate in sorted({normalize_answer(a) for a in answers}):
    # The candidate is a prediction: the metric processes it as it does any prediction.
    matches = counts[vqa_metrics.process_prediction(candidate, normalise)]
    # Leaving out one of the `matches` humans leaves matches - 1; leaving out another leaves all.
    scores[candidate] = (matches * min(1.0, (matches - 1) / 3) +
                         (total - matches) * min(1.0, matches / 3)) / total
  return scores


def build_answer_vocab(annotations: Iterable[dict], min_count: int = 9,
                       max_answers: Optional[int] = None) -> list[str]:
  """Normalised multiple_choice_answers seen >= min_count times, most frequent (then A-Z) first."""
  counts = collections.Counter(normalize_answer(a["multiple_choice_answer"]) for a in annotations)
  kept = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
  return kept[:max_answers]


def load_answer_vocab(config: str = "official", data_dir: Optional[str] = None) -> list[str]:
  """The answer vocabulary of the built `vqa_v2/<config>` (index = class id)."""
  builder = VqaV2(config=config, data_dir=data_dir or paths.tfds_data_dir())
  path = os.path.join(builder.data_dir, ANSWER_VOCAB_FILE)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"no answer vocabulary at {path}: build vqa_v2/{config} first "
                            f"(`python -m tasks.build downstream ...`)")
  with tf.io.gfile.GFile(path) as f:
    return f.read().splitlines()


class VqaV2(common.RawFilesBuilder):
  """VQA v2 with the answer vocabulary and soft scores, from local files."""
  VERSION = tfds.core.Version("1.0.0")
  SOURCE_SUBDIR = "vqa_v2"
  EXPECTED = EXPECTED

  def __init__(self, *, image_dir: Optional[str] = None, min_answer_count: int = 9,
               max_answers: Optional[int] = None, **kwargs):
    self._image_dir = image_dir
    self._min_answer_count = min_answer_count
    self._max_answers = max_answers
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image_id": tfds.features.Scalar(dtype=np.int64),
            "question_id": tfds.features.Scalar(dtype=np.int64),
            "question": tfds.features.Text(),
            "question_type": tfds.features.Text(),
            "answer_type": tfds.features.Text(),
            "multiple_choice_answer": tfds.features.Text(),
            "answers": tfds.features.Sequence(tfds.features.Text()),
            "answer_ids": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int32)),
            "answer_scores": tfds.features.Sequence(tfds.features.Scalar(dtype=np.float32)),
        }),
        metadata=tfds.core.MetadataDict(min_answer_count=self._min_answer_count,
                                        max_answers=self._max_answers),
    )

  def image_dir(self) -> str:
    """Where the COCO images are: image_dir=, else source_dir if it has train2014/, else ../coco."""
    if self._image_dir:
      return self._image_dir
    source = self.source_dir()
    if tf.io.gfile.exists(os.path.join(source, "train2014")):
      return source
    return os.path.join(os.path.dirname(os.path.normpath(source)), "coco")

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    root, image_root = self.source_dir(), self.image_dir()
    common.require(self.name, root, EXPECTED, OPTIONAL)
    common.require(f"{self.name} images", image_root, EXPECTED_IMAGES)
    annotations = {split: common.read_json(os.path.join(root, _annotations_file(stem)))
                   ["annotations"]
                   for split, (stem, _, annotated) in _SPLITS.items() if annotated}
    vocab = build_answer_vocab(annotations["train"] + annotations["validation"],
                               self._min_answer_count, self._max_answers)
    # self.data_path is the dataset's temporary directory here: the file lands next to the data.
    tf.io.gfile.makedirs(os.fspath(self.data_path))
    with tf.io.gfile.GFile(os.path.join(self.data_path, ANSWER_VOCAB_FILE), "w") as f:
      f.write("".join(a + "\n" for a in vocab))
    answer_ids = {a: i for i, a in enumerate(vocab)}

    splits = {}
    for split, (stem, image_folder, annotated) in _SPLITS.items():
      questions_path = os.path.join(root, _questions_file(stem))
      if annotated or tf.io.gfile.exists(questions_path):
        splits[split] = self._generate_examples(
            split, questions_path, annotations.get(split, ()), answer_ids,
            os.path.join(image_root, image_folder), image_folder)
    return splits

  def _generate_examples(self, split: str, questions_path: str, annotations: Sequence[dict],
                         answer_ids: dict[str, int], image_folder: str, image_prefix: str):
    by_question = {a["question_id"]: a for a in annotations}
    questions = sorted(common.read_json(questions_path)["questions"],
                       key=lambda q: (q["image_id"], q["question_id"]))
    image_id, image = None, None
    with common.SkipCounter(f"{self.name} {split}") as skipped:
      for question in questions:
        if question["image_id"] != image_id:  # questions come grouped by image: read it once
          image_id = question["image_id"]
          image = common.read_bytes(
              os.path.join(image_folder, f"COCO_{image_prefix}_{image_id:012d}.jpg"))
        if image is None:
          skipped.count += 1
          continue
        annotation = by_question.get(question["question_id"], {})
        answers = [a["answer"] for a in annotation.get("answers", ())]
        scored = sorted((answer_ids[a], s) for a, s in answer_scores(answers).items()
                        if a in answer_ids and s > 0)
        yield question["question_id"], {
            "image": image,
            "image_id": image_id,
            "question_id": question["question_id"],
            "question": question["question"],
            "question_type": annotation.get("question_type", ""),
            "answer_type": annotation.get("answer_type", ""),
            "multiple_choice_answer": annotation.get("multiple_choice_answer", ""),
            "answers": answers,
            "answer_ids": [i for i, _ in scored],
            "answer_scores": [s for _, s in scored],
        }
