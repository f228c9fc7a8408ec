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
  train2014/COCO_train2014_%012d.jpg, val2014/COCO_val2014_%012d.jpg, test2015/COCO_test2015_%012d.jpg

Splits: train, validation, and test_dev / test if their question files are there.
Features: image, image_id, question_id, question, question_type, answer_type ("yes/no", "number",
"other"; "" for test), multiple_choice_answer, answers (the ten raw human answers), answer_ids and
answer_scores (the classifier target: every human answer that is in the answer vocabulary, with
its VQA score; see `answer_scores`).

Answer vocabulary (the literature's 3,129 answers, the bottom-up-attention recipe): normalise each
question's multiple_choice_answer with the official VQA normalisation (`normalize_answer`), count
over train + val, keep the answers seen at least `min_answer_count` (9) times, most frequent first.
On the real data that gives 3,129 answers. `max_answers` optionally keeps only the top k instead.
The list is written to `answers.txt` in the built dataset's directory (line i = class i) and read
back with `load_answer_vocab`.
"""
import collections
import os
import re
from typing import Iterable, Optional, Sequence

import tensorflow as tf
import tensorflow_datasets as tfds

from simvlm_jax.data import paths
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

# ------------------------------------------------------------------------------------------------
# The official answer normalisation (GT-Vision-Lab/VQA, vqaEval.py), as the bottom-up-attention
# recipe applies it to build the answer vocabulary.

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# The official pattern, typo included: "(?!<=\d)" never matches, so this strips every period
# that is not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")


def _process_punctuation(text: str) -> str:
  out = text
  for p in _PUNCTUATION:
    if p + " " in text or " " + p in text or _COMMA_STRIP.search(text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
  """The official VQA normalisation (whitespace, punctuation, lower case, number words to digits,
  no articles, contractions restored), plus the recipe's removal of remaining commas."""
  answer = answer.replace("\n", " ").replace("\t", " ").strip()
  return _process_digit_article(_process_punctuation(answer)).replace(",", "")


def answer_scores(answers: Sequence[str]) -> dict[str, float]:
  """{normalised answer: its official VQA accuracy as a prediction} for each distinct human answer.

  The accuracy is the mean over the leave-one-annotator-out subsets of min(1, matches / 3); with
  ten answers that is 0.3, 0.6, 0.9 and 1.0 for 1, 2, 3 and 4+ matching humans.
  """
  normalised = [normalize_answer(a) for a in answers]
  return {candidate: sum(min(1.0, (normalised.count(candidate) - (n == candidate)) / 3)
                         for n in normalised) / len(normalised)
          for candidate in sorted(set(normalised))}


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
            "image_id": tfds.features.Scalar(dtype="int64"),
            "question_id": tfds.features.Scalar(dtype="int64"),
            "question": tfds.features.Text(),
            "question_type": tfds.features.Text(),
            "answer_type": tfds.features.Text(),
            "multiple_choice_answer": tfds.features.Text(),
            "answers": tfds.features.Sequence(tfds.features.Text()),
            "answer_ids": tfds.features.Sequence(tfds.features.Scalar(dtype="int32")),
            "answer_scores": tfds.features.Sequence(tfds.features.Scalar(dtype="float32")),
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
        scored = [(answer_ids[a], s) for a, s in answer_scores(answers).items() if a in answer_ids]
        scored.sort()
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
