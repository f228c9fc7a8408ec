"""VQA accuracy, as GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py` computes it.

Per question, with the 10 human answers:
  1. The prediction: newlines and tabs become spaces, then strip; `process_punctuation`;
     `process_digit_article` (lowercase, number words to digits, drop articles, restore
     contractions).
  2. The human answers get `process_punctuation` only, and only when they are not all identical
     (`len(set(answers)) > 1`). The official code does exactly this: it relies on the released
     annotations being normalised already, so an answer such as "Two" in the annotations would never
     match (the prediction side always becomes "2").
  3. For each human answer i: acc_i = min(1, #{j != i : answer_j == prediction} / 3). The question
     scores the mean of the 10 acc_i (an answer given by 1, 2, 3, >= 4 annotators scores 0.3, 0.6,
     0.9, 1.0).
Reported: 100 x the mean over questions, overall, per answer type and per question type. The
official code rounds these to 2 decimals for printing; here they keep full precision.
"""
import re
from typing import Any, Mapping, Optional, Sequence

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


def normalize_prediction(answer: str) -> str:
  """The official normalisation of a predicted answer."""
  answer = answer.replace("\n", " ").replace("\t", " ").strip()
  return process_digit_article(process_punctuation(answer))


def question_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """Accuracy in [0, 1] of one prediction against the human answers of one question."""
  prediction = normalize_prediction(prediction)
  answers = list(answers)
  if len(set(answers)) > 1:
    answers = [process_punctuation(a) for a in answers]
  accs = []
  for i in range(len(answers)):
    matches = sum(a == prediction for j, a in enumerate(answers) if j != i)
    accs.append(min(1.0, matches / 3))
  return sum(accs) / len(accs)


def _mean_by(scores: Sequence[float], keys: Sequence[str]) -> dict[str, float]:
  groups: dict[str, list[float]] = {}
  for s, k in zip(scores, keys):
    groups.setdefault(k, []).append(s)
  return {k: sum(v) / len(v) for k, v in groups.items()}


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]],
                 answer_types: Optional[Sequence[str]] = None,
                 question_types: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """VQA accuracy x100: {"overall", "per_answer_type", "per_question_type", "per_question"}.

  The per-type dicts are empty when the types are not given; "per_question" lists every question's
  score (x100), in order.
  """
  n = len(predictions)
  if n == 0:
    raise ValueError("vqa_accuracy needs at least one prediction")
  for name, seq in (("answers", answers), ("answer_types", answer_types),
                    ("question_types", question_types)):
    if seq is not None and len(seq) != n:
      raise ValueError(f"{name} has {len(seq)} entries for {n} predictions")
  if any(len(a) == 0 for a in answers):
    raise ValueError("every question needs at least one human answer")
  scores = [100.0 * question_accuracy(p, a) for p, a in zip(predictions, answers)]
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


def vqa_metric(targets: Sequence[Mapping[str, Any]],
               predictions: Sequence[Any]) -> dict[str, float]:
  """seqio metric fn. Each target: {"answers": the human answers, "answer_type": str}.

  Returns "vqa_accuracy" and one "vqa_accuracy_<answer type>" per answer type ("yes/no" ->
  "vqa_accuracy_yes_no"). Per question type scores stay in `vqa_accuracy` (65 types in VQA v2 would
  swamp the summaries).
  """
  result = vqa_accuracy([_text(p) for p in predictions],
                        [[_text(a) for a in t["answers"]] for t in targets],
                        [_text(t["answer_type"]) for t in targets])
  metrics = {"vqa_accuracy": result["overall"]}
  for answer_type, score in sorted(result["per_answer_type"].items()):
    metrics[f"vqa_accuracy_{metric_key(answer_type)}"] = score
  return metrics
