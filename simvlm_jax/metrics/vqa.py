"""VQA accuracy, as GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py` computes it.

Two versions of the official code are in use; `version` picks one (default "2021"):

  "2021" (alias "current"): the code since commit a013f0043c1e2cdc995922dfe257f7149aa9af06
      ("Fixed processing answers bug", 2021-03-11), what the repository ships today.
  "2016" (alias "legacy"): the code before it, as of commit 458a8b268b1a239dc388e0af4423f3fe7477b04f
      (2016-10-08, which fixed the contractions table; the scoring rule itself dates from 2015):
      what the repository shipped until March 2021, and what many published numbers used.
The commit changed only which side is normalised when (steps 1-3 below); the tables, the
normalisation functions and the leave-one-out scoring are the same in both.

Per question, with the 10 human answers and one prediction:
  1. Whitespace. The prediction: newlines and tabs become spaces, then strip (both versions). The
     human answers: the same in "2021"; untouched in "2016" (so "red " never matches "red").
  2. "Differ": the human answers (whitespace-cleaned in "2021", raw in "2016") are not all
     identical (`len(set(answers)) > 1`).
  3. Normalisation, with `process_punctuation` (punctuation, periods) and `process_digit_article`
     (lowercase, number words to digits, drop articles, restore contractions):
       "2021": only if they differ, and then on both sides: the human answers and the prediction get
               `process_punctuation` then `process_digit_article`. If all ten are identical, neither
               side is normalised: "Yes" or "yes." scores 0 against ten "yes", "t-shirt" scores 1
               against ten "t-shirt".
       "2016": the prediction always gets both steps; the human answers get `process_punctuation`
               only, and only if they differ. So "Two" or "a dog" in the answers never match (the
               prediction side always becomes "2" or "dog"), and a prediction "t-shirt" misses ten
               "t-shirt" answers (it becomes "t shirt").
  4. For each human answer i: acc_i = min(1, #{j != i : answer_j == prediction} / 3). The question
     scores the mean of the 10 acc_i (an answer given by 1, 2, 3, >= 4 annotators scores 0.3, 0.6,
     0.9, 1.0). (The official code leaves out answer i by comparing answer dicts, which differ in
     their answer_id: the same as leaving out index i.)
Reported: 100 x the mean over questions, overall, per answer type and per question type. The
official code rounds these to 2 decimals for printing; here they keep full precision.
"""
import re
from typing import Any, Callable, Mapping, Optional, Sequence

# The official table, including its quirks: keys with a capital I never match (answers are
# lowercased first), and "somebody'd" maps to "somebodyd".
CONTRACTIONS = {
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
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
# Apostrophes, colons and periods are not here: apostrophes must survive for the contractions, and
# periods have their own rule below.
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
         "`", ",", "?", "!")
# The official pattern, verbatim: `(?!<=\d)` is a lookahead (a typo for a lookbehind) that always
# holds, so this deletes every period not followed by a digit ("a.m." -> "am", "2.5" stays).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official code calls `periodStrip.sub("", text, re.UNICODE)`: the flag lands in the `count`
# argument, so at most 32 periods are deleted.
_PERIOD_STRIP_COUNT = int(re.UNICODE)

# The metric versions (see the module docstring), named by the year of their upstream commit.
VERSION_2021 = "2021"  # GT-Vision-Lab/VQA a013f0043c1e2cdc995922dfe257f7149aa9af06
VERSION_2016 = "2016"  # GT-Vision-Lab/VQA 458a8b268b1a239dc388e0af4423f3fe7477b04f
VERSIONS = (VERSION_2021, VERSION_2016)
VERSION_ALIASES = {"current": VERSION_2021, "legacy": VERSION_2016}
DEFAULT_VERSION = VERSION_2021


def process_punctuation(text: str) -> str:
  """Deletes each punctuation char that touches a space (or all of them, if the text holds a
  digit-comma-digit such as "1,000"); otherwise replaces it by a space. Then strips periods."""
  out = text
  for p in PUNCT:
    if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
  """Lowercases, maps number words to digits, drops articles, restores contractions."""
  words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_prediction(answer: str) -> str:
  """The full official normalisation of an answer: whitespace, punctuation, digits and articles.

  What "2016" always applies to a prediction, and "2021" applies to both sides when the human
  answers differ.
  """
  return process_digit_article(process_punctuation(_clean_whitespace(answer)))


def resolve_version(version: str) -> str:
  """The canonical name ("2021" or "2016") of a metric version or its alias."""
  resolved = VERSION_ALIASES.get(version, version)
  if resolved not in VERSIONS:
    raise ValueError(f"unknown VQA metric version {version!r}: expected one of "
                     f"{VERSIONS + tuple(VERSION_ALIASES)}")
  return resolved


def process_answers(answers: Sequence[str],
                    version: str = DEFAULT_VERSION) -> tuple[list[str], bool]:
  """(the human answers as the official code compares them, whether the prediction is normalised).

  The flag is what `process_prediction` needs: always True for "2016"; for "2021", whether the
  answers differ.
  """
  version = resolve_version(version)
  if version == VERSION_2021:
    # Upstream cleans the answers in place first, so the "differ" test sees them cleaned.
    answers = [_clean_whitespace(a) for a in answers]
    if len(set(answers)) > 1:
      return _map_distinct(normalize_prediction, answers), True
    return answers, False
  # "2016" relied on the released annotations being normalised already: punctuation only.
  answers = list(answers)
  if len(set(answers)) > 1:
    answers = _map_distinct(process_punctuation, answers)
  return answers, True


def _map_distinct(fn: Callable[[str], str], texts: list[str]) -> list[str]:
  # Once per distinct answer: the dataset builder scores every question of VQA v2 (~650k).
  done = {t: fn(t) for t in set(texts)}
  return [done[t] for t in texts]


def process_prediction(prediction: str, normalise: bool) -> str:
  """The prediction as compared: whitespace-cleaned, and fully normalised if `normalise`."""
  return normalize_prediction(prediction) if normalise else _clean_whitespace(prediction)


def _leave_one_out(prediction: str, answers: Sequence[str]) -> float:
  accs = []
  for i in range(len(answers)):
    matches = sum(a == prediction for j, a in enumerate(answers) if j != i)
    accs.append(min(1.0, matches / 3))
  return sum(accs) / len(accs)


def question_accuracy(prediction: str, answers: Sequence[str],
                      version: str = DEFAULT_VERSION) -> float:
  """Accuracy in [0, 1] of one prediction against the human answers of one question.

  Args:
    prediction: the predicted answer text.
    answers: the human answers (10 in VQA), raw as in the annotation files.
    version: "2021" / "current" (default) or "2016" / "legacy"; see the module docstring.
  """
  answers, normalise = process_answers(answers, version)
  return _leave_one_out(process_prediction(prediction, normalise), answers)


def _mean_by(scores: Sequence[float], keys: Sequence[str]) -> dict[str, float]:
  groups: dict[str, list[float]] = {}
  for s, k in zip(scores, keys):
    groups.setdefault(k, []).append(s)
  return {k: sum(v) / len(v) for k, v in groups.items()}


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]],
                 answer_types: Optional[Sequence[str]] = None,
                 question_types: Optional[Sequence[str]] = None,
                 version: str = DEFAULT_VERSION) -> dict[str, Any]:
  """VQA accuracy x100: {"overall", "per_answer_type", "per_question_type", "per_question"}.

  The per-type dicts are empty when the types are not given; "per_question" lists every question's
  score (x100), in order. `version`: "2021" / "current" (default) or "2016" / "legacy", see the
  module docstring.
  """
  version = resolve_version(version)  # an unknown name fails before any scoring
  n = len(predictions)
  if n == 0:
    raise ValueError("vqa_accuracy needs at least one prediction")
  for name, seq in (("answers", answers), ("answer_types", answer_types),
                    ("question_types", question_types)):
    if seq is not None and len(seq) != n:
      raise ValueError(f"{name} has {len(seq)} entries for {n} predictions")
  if any(len(a) == 0 for a in answers):
    raise ValueError("every question needs at least one human answer")
  scores = [100.0 * question_accuracy(p, a, version) for p, a in zip(predictions, answers)]
  return {
      "overall": sum(scores) / n,
      "per_answer_type": _mean_by(scores, answer_types) if answer_types is not None else {},
      "per_question_type": _mean_by(scores, question_types) if question_types is not None else {},
      "per_question": scores,
  }


def _text(x: Any) -> str:
  """seqio hands over numpy bytes for string features."""
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def metric_key(name: str) -> str:
  """A TensorBoard-friendly key: "yes/no" -> "yes_no"."""
  return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")


def vqa_metric(targets: Sequence[Mapping[str, Any]], predictions: Sequence[Any],
               version: str = DEFAULT_VERSION) -> dict[str, float]:
  """seqio metric fn. Each target: {"answers": the human answers, "answer_type": str}.

  Returns "vqa_accuracy" and one "vqa_accuracy_<answer type>" per answer type ("yes/no" ->
  "vqa_accuracy_yes_no"). Per question type scores stay in `vqa_accuracy` (65 types in VQA v2 would
  swamp the summaries). `version` as `vqa_accuracy`'s (bind it with functools.partial: seqio calls
  metric fns with targets and predictions only).
  """
  result = vqa_accuracy([_text(p) for p in predictions],
                        [[_text(a) for a in t["answers"]] for t in targets],
                        [_text(t["answer_type"]) for t in targets], version=version)
  metrics = {"vqa_accuracy": result["overall"]}
  for answer_type, score in sorted(result["per_answer_type"].items()):
    metrics[f"vqa_accuracy_{metric_key(answer_type)}"] = score
  return metrics
