"""Tests of the official metrics (simvlm_jax/metrics/), against hand-computed values.

The caption tests need Java (PTB tokenizer, METEOR), as the official metrics do; METEOR's ~10 s
start-up is paid once, by a module-scoped fixture.
"""
import collections
import functools
import logging
import math

import numpy as np
import pytest

from simvlm_jax.metrics import captions, classification, vqa

# --- VQA: answer normalisation --------------------------------------------------------------------

@pytest.mark.parametrize("raw, normalised", [
    ("yes.", "yes"),               # a period not before a digit goes
    ("Yes", "yes"),
    ("  yes \n", "yes"),           # whitespace, newlines, tabs
    ("\tthe red one\n", "red 1"),
    ("yes!", "yes"),               # "!" touches no space: replaced by a space, then split away
    ("t-shirt", "t shirt"),        # ... so it splits words
    ("black/white", "black white"),
    ("black / white", "black white"),  # " /" touches a space: deleted
    ("red, blue", "red blue"),
    ("red,blue", "red blue"),
    ("1,000", "1000"),             # digit-comma-digit: every punctuation char is deleted
    ("1,000 (approx)", "1000 approx"),
    ("a.m.", "am"),                # periods go unless a digit follows
    ("10 a.m.", "10 am"),
    ("2.5", "2.5"),
    ("5.", "5"),
    ("dont", "don't"),
    ("Don't", "don't"),
    ("isnt", "isn't"),
    ("Im", "im"),                  # the official table's "Im" key never matches lowercased text
    ("two", "2"),
    ("Two dogs", "2 dogs"),
    ("none", "0"),
    ("the dog", "dog"),
    ("a dog", "dog"),
    ("an apple", "apple"),
])
def test_normalize_prediction(raw, normalised):
  assert vqa.normalize_prediction(raw) == normalised


def test_period_strip_keeps_the_official_count_of_32():
  # Upstream passes re.UNICODE (32) as the `count` of re.sub.
  assert vqa.process_punctuation("." * 40 + "x") == "." * 8 + "x"


# --- VQA: accuracy --------------------------------------------------------------------------------

@pytest.mark.parametrize("k, expected",
                         [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_accuracy(k, expected):
  # k annotators said "yes". Each of the k "yes" answers leaves k-1 matches among the other 9, each
  # of the 10-k others leaves k: k=1 -> (1*0 + 9*1/3)/10 = 0.3; k=2 -> (2*1/3 + 8*2/3)/10 = 0.6;
  # k=3 -> (3*2/3 + 7*1)/10 = 0.9; k=4 -> 10/10.
  answers = ["yes"] * k + ["no"] * (10 - k)
  assert vqa.question_accuracy("yes", answers) == pytest.approx(expected)
  # "2016" always normalises the prediction ("Yes." -> "yes"); "2021" only when the answers differ
  # (for k = 10 it compares "Yes." with "yes" and scores 0: see test_vqa_versions_differ).
  assert vqa.question_accuracy("Yes.", answers, version="2016") == pytest.approx(expected)
  if k < 10:
    assert vqa.question_accuracy("Yes.", answers, version="2021") == pytest.approx(expected)


# Hand-worked cases of the two metric versions (see the simvlm_jax.metrics.vqa docstring). With m of
# the ten processed human answers equal to the processed prediction, the question scores
# (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10: m = 0, 1, 2, 3, >= 4 -> 0, 0.3, 0.6, 0.9, 1.0.
# "2021": both sides fully normalised iff the (whitespace-stripped) answers differ, else neither.
# "2016": prediction always fully normalised; answers get punctuation only, iff the raw ones differ.
VERSION_CASES = [
    # (prediction, human answers, accuracy "2021", accuracy "2016")
    # Number words in the answers. 2021: they differ, so "2", "two", "Two" all -> "2"; the
    # prediction "two" -> "2": m = 10 -> 1.0. 2016: answers keep "two"/"Two" (punctuation only);
    # the prediction -> "2" matches the two "2": m = 2 -> 0.6.
    ("two", ["2"] * 2 + ["two"] * 4 + ["Two"] * 4, 1.0, 0.6),
    ("Two", ["2"] * 2 + ["two"] * 4 + ["Two"] * 4, 1.0, 0.6),
    # Articles. 2021: "a dog" -> "dog", m = 5 -> 1.0. 2016: "a dog" stays, only the two "dog"
    # match the prediction: m = 2 -> 0.6.
    ("dog", ["a dog"] * 3 + ["dog"] * 2 + ["cat"] * 5, 1.0, 0.6),
    # 2021: answers -> "dog" x9, the prediction "the dog" -> "dog": m = 9 -> 1.0. 2016: the
    # answers keep "the dog", the prediction becomes "dog": m = 0 -> 0.0.
    ("the dog", ["the dog"] * 9 + ["cat"], 1.0, 0.0),
    # All ten identical, the prediction needs normalising. 2021 normalises neither side: "Yes",
    # "yes." and "two" are compared as they are, m = 0 -> 0.0. 2016: the prediction -> "yes" / "2",
    # m = 10 -> 1.0.
    ("Yes", ["yes"] * 10, 0.0, 1.0),
    ("yes.", ["yes"] * 10, 0.0, 1.0),
    ("two", ["2"] * 10, 0.0, 1.0),
    # All ten identical and unnormalised. 2021: "t-shirt" == "t-shirt", m = 10 -> 1.0. 2016: the
    # prediction -> "t shirt", the answers stay "t-shirt": m = 0 -> 0.0.
    ("t-shirt", ["t-shirt"] * 10, 1.0, 0.0),
    # ... and an already-normalised prediction misses in both: m = 0 -> 0.0.
    ("t shirt", ["t-shirt"] * 10, 0.0, 0.0),
    # Contractions. 2021: "dont" -> "don't" in the answers too, m = 6 -> 1.0. 2016: the answers
    # keep "dont", so only the three "don't" match (a prediction "dont" -> "don't"): m = 3 -> 0.9.
    ("don't", ["dont"] * 3 + ["don't"] * 3 + ["no"] * 4, 1.0, 0.9),
    ("dont", ["dont"] * 3 + ["don't"] * 3 + ["no"] * 4, 1.0, 0.9),
    # Whitespace in the answers. 2021 strips them first: "red" x4, m = 4 -> 1.0. 2016 leaves
    # "red " (punctuation processing keeps spaces): m = 2 -> 0.6.
    ("red", ["red"] * 2 + ["red "] * 2 + ["blue"] * 6, 1.0, 0.6),
    # 2021: stripped, the ten are identical, so "Yes" is not lowercased: m = 0 -> 0.0. 2016: the raw
    # answers differ, the prediction -> "yes" matches the nine "yes" (" yes" stays): m = 9 -> 1.0.
    ("Yes", ["yes"] * 9 + [" yes"], 0.0, 1.0),
    # Agreements. Both strip the prediction's newline: "yes", m = 10 -> 1.0.
    ("yes\n", ["yes"] * 10, 1.0, 1.0),
    # They differ, so both turn "t-shirt" (no space next to "-") into "t shirt": m = 9 -> 1.0.
    ("t-shirt", ["t-shirt"] * 9 + ["shirt"], 1.0, 1.0),
    # A digit-comma-digit deletes the comma on both sides in both: "1000" x10 -> 1.0.
    ("1,000", ["1,000"] * 3 + ["1000"] * 7, 1.0, 1.0),
    # "/" touching no space becomes a space: "black white" x3 in both ("and" is no article, so the
    # three "black and white" never match): m = 3 -> 0.9.
    ("black/white", ["black/white"] * 3 + ["black and white"] * 3 + ["gray"] * 4, 0.9, 0.9),
]


@pytest.mark.parametrize("prediction, answers, acc_2021, acc_2016", VERSION_CASES)
def test_vqa_versions_differ(prediction, answers, acc_2021, acc_2016):
  assert vqa.question_accuracy(prediction, answers) == pytest.approx(acc_2021)  # the default
  assert vqa.question_accuracy(prediction, answers, version="2021") == pytest.approx(acc_2021)
  assert vqa.question_accuracy(prediction, answers, version="current") == pytest.approx(acc_2021)
  assert vqa.question_accuracy(prediction, answers, version="2016") == pytest.approx(acc_2016)
  assert vqa.question_accuracy(prediction, answers, version="legacy") == pytest.approx(acc_2016)


def test_vqa_version_names():
  assert vqa.DEFAULT_VERSION == "2021"
  assert [vqa.resolve_version(v) for v in ("2021", "current", "2016", "legacy")] == \
      ["2021", "2021", "2016", "2016"]
  with pytest.raises(ValueError, match="unknown VQA metric version"):
    vqa.resolve_version("2017")
  with pytest.raises(ValueError, match="unknown VQA metric version"):
    vqa.vqa_accuracy(["yes"], [["yes"] * 10], version="newest")


def test_vqa_accuracy_overall_and_per_type():
  predictions = ["yes", "two", "dog", "no"]
  answers = [["yes"] * 4 + ["no"] * 6,    # 4 annotators -> 1.0
             ["2"] * 2 + ["3"] * 8,       # "two" -> "2", 2 annotators -> 0.6
             ["cat"] * 10,                # 0
             ["no"] + ["yes"] * 9]        # 1 annotator -> 0.3
  for version in vqa.VERSIONS:  # no case here that tells the versions apart
    result = vqa.vqa_accuracy(predictions, answers, ["yes/no", "number", "other", "yes/no"],
                              ["is the", "how many", "what is", "is the"], version=version)
    assert result["per_question"] == pytest.approx([100.0, 60.0, 0.0, 30.0])
    assert result["overall"] == pytest.approx((100 + 60 + 0 + 30) / 4)  # 47.5
    assert result["per_answer_type"] == pytest.approx(
        {"yes/no": 65.0, "number": 60.0, "other": 0.0})
    assert result["per_question_type"] == pytest.approx(
        {"is the": 65.0, "how many": 60.0, "what is": 0.0})
  assert vqa.vqa_accuracy(predictions, answers)["per_answer_type"] == {}


def test_vqa_accuracy_aggregates_each_version():
  predictions = ["Yes", "two", "dog", "no", "t-shirt"]
  answers = [["yes"] * 10,                               # 2021: 0,   2016: 100 (cases above)
             ["2"] * 2 + ["two"] * 4 + ["Two"] * 4,      # 2021: 100, 2016: 60
             ["a dog"] * 3 + ["dog"] * 2 + ["cat"] * 5,  # 2021: 100, 2016: 60
             ["no"] + ["yes"] * 9,                       # both: 1 annotator -> 30
             ["t-shirt"] * 10]                           # 2021: 100, 2016: 0
  answer_types = ["yes/no", "number", "other", "yes/no", "other"]
  question_types = ["is the", "how many", "what is", "is the", "what is"]
  expected = {
      # overall (0 + 100 + 100 + 30 + 100) / 5 = 66; yes/no (0 + 30) / 2 = 15; number 100;
      # other (100 + 100) / 2 = 100.
      "2021": ([0.0, 100.0, 100.0, 30.0, 100.0], 66.0,
               {"yes/no": 15.0, "number": 100.0, "other": 100.0}),
      # overall (100 + 60 + 60 + 30 + 0) / 5 = 50; yes/no (100 + 30) / 2 = 65; number 60;
      # other (60 + 0) / 2 = 30.
      "2016": ([100.0, 60.0, 60.0, 30.0, 0.0], 50.0,
               {"yes/no": 65.0, "number": 60.0, "other": 30.0}),
  }
  for version, (per_question, overall, per_answer_type) in expected.items():
    result = vqa.vqa_accuracy(predictions, answers, answer_types, question_types, version=version)
    assert result["per_question"] == pytest.approx(per_question)
    assert result["overall"] == pytest.approx(overall)
    assert result["per_answer_type"] == pytest.approx(per_answer_type)
    # The question types group the same questions as the answer types here.
    assert result["per_question_type"] == pytest.approx(
        {"is the": per_answer_type["yes/no"], "how many": per_answer_type["number"],
         "what is": per_answer_type["other"]})
    # Per question, the aggregation is question_accuracy x100.
    assert per_question == pytest.approx(
        [100 * vqa.question_accuracy(p, a, version) for p, a in zip(predictions, answers)])
  assert vqa.vqa_accuracy(predictions, answers)["overall"] == pytest.approx(66.0)  # default 2021


def test_vqa_accuracy_rejects_mismatched_inputs():
  with pytest.raises(ValueError):
    vqa.vqa_accuracy(["yes"], [["yes"] * 10, ["no"] * 10])
  with pytest.raises(ValueError):
    vqa.vqa_accuracy([], [])


def test_vqa_metric_takes_seqio_targets_with_bytes():
  targets = [{"answers": np.array([b"yes"] * 10), "answer_type": b"yes/no"},
             {"answers": [b"2"] * 2 + [b"3"] * 8, "answer_type": "number"}]
  # "2016": "Yes" -> "yes", 10 annotators -> 100; "two" -> "2", 2 annotators -> 60.
  assert vqa.vqa_metric(targets, [b"Yes", "two"], version="2016") == pytest.approx(
      {"vqa_accuracy": 80.0, "vqa_accuracy_yes_no": 100.0, "vqa_accuracy_number": 60.0})
  # The default "2021": ten identical "yes" leave "Yes" as it is -> 0; "two" as in 2016 -> 60.
  assert vqa.vqa_metric(targets, [b"Yes", "two"]) == pytest.approx(
      {"vqa_accuracy": 30.0, "vqa_accuracy_yes_no": 0.0, "vqa_accuracy_number": 60.0})
  # seqio calls a metric fn with (targets, predictions): the version binds with a partial.
  legacy = functools.partial(vqa.vqa_metric, version="legacy")
  assert legacy(targets, [b"Yes", "two"])["vqa_accuracy"] == pytest.approx(80.0)


# --- COCO captions --------------------------------------------------------------------------------

# Lowercase words without punctuation: the PTB tokenizer leaves them as they are, so the expected
# values below can be computed on the raw strings.
CORPUS_REFS = {
    "dog": ["a dog runs on the grass", "a brown dog is running"],
    "cat": ["a cat sits on a red sofa", "the cat is sleeping"],
    "car": ["A red car, parked.", "a red car parked on the street"],
}
CORPUS_PREDS = {"dog": "a dog is running on grass", "cat": "a cat is on the sofa",
                "car": "a red car parked"}


@pytest.fixture(scope="module")
def full_caption_scores():
  """All metrics once (METEOR included), with a record of the METEOR wrappers created."""
  created = []

  class SpyMeteor(captions._Meteor):

    def __init__(self):
      super().__init__()
      created.append(self)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(captions, "_Meteor", SpyMeteor)
    corpus, per_image = captions.coco_caption_scores(CORPUS_PREDS, CORPUS_REFS)
  return corpus, per_image, created


def test_caption_metrics_report_everything_and_spice_as_unavailable(full_caption_scores):
  corpus, per_image, _ = full_caption_scores
  assert set(corpus) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr",
                         "SPICE", "SPICE_unavailable"}
  assert corpus["SPICE"] is None
  assert "CoreNLP" in corpus["SPICE_unavailable"] and "network" in corpus["SPICE_unavailable"]
  assert set(per_image) == set(CORPUS_REFS)
  # ROUGE-L and CIDEr average the images (BLEU and METEOR pool their statistics instead).
  for name in ("ROUGE_L", "CIDEr"):
    assert corpus[name] == pytest.approx(np.mean([s[name] for s in per_image.values()]))


def test_meteor_partial_and_exact_match_and_process_closed(full_caption_scores):
  corpus, per_image, created = full_caption_scores
  # "a red car parked" is the PTB-tokenized first reference ("A red car, parked.") exactly.
  assert per_image["car"]["METEOR"] == pytest.approx(1.0, abs=1e-6)
  assert 0.0 < per_image["dog"]["METEOR"] < 1.0
  assert 0.0 < per_image["cat"]["METEOR"] < 1.0
  assert 0.0 < corpus["METEOR"] <= 1.0
  assert len(created) == 1 and created[0].meteor_p.returncode is not None  # java has exited


def test_identical_prediction_scores_one(full_caption_scores):
  _, per_image, _ = full_caption_scores
  assert per_image["car"]["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
  assert per_image["car"]["ROUGE_L"] == pytest.approx(1.0)


def test_corpus_bleu_1_with_brevity_penalty():
  # Image 1: "a cat runs" against refs of 5 and 4 words; "closest" picks 4. Clipped unigram matches:
  # "a", "runs" -> 2 of 3. Image 2 matches its 3-word ref exactly. Corpus: 5 of 6 unigrams match,
  # hypothesis length 6 against reference length 4 + 3 = 7: BP = exp(1 - 7/6).
  refs = {1: ["a dog runs on grass", "the dog runs fast"], 2: ["a red car"]}
  preds = {1: "a cat runs", 2: "a red car"}
  corpus, per_image = captions.coco_caption_scores(preds, refs, metrics=("Bleu",))
  assert corpus["Bleu_1"] == pytest.approx(5 / 6 * math.exp(1 - 7 / 6), rel=1e-6)  # 0.7054
  assert per_image[1]["Bleu_1"] == pytest.approx(2 / 3 * math.exp(1 - 4 / 3), rel=1e-6)
  assert corpus["Bleu_2"] < corpus["Bleu_1"]


def test_rouge_l_hand_computed():
  # LCS("a dog runs fast", "a dog is running fast") = "a dog fast" = 3: P = 3/4, R = 3/5,
  # F = (1 + 1.2^2) P R / (R + 1.2^2 P).
  corpus, _ = captions.coco_caption_scores({0: "a dog runs fast"}, {0: ["a dog is running fast"]},
                                           metrics=("ROUGE_L",))
  p, r, beta2 = 3 / 4, 3 / 5, 1.2 ** 2
  assert corpus["ROUGE_L"] == pytest.approx((1 + beta2) * p * r / (r + beta2 * p))  # 0.6536


def _cider_d(preds, refs, sigma=6.0):
  """CIDEr-D as in Vedantam et al. 2015, written independently of pycocoevalcap."""
  def ngrams(sentence, n):
    words = sentence.split()
    return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))

  ids = list(refs)
  num_images = len(ids)
  df = collections.Counter()
  for k in ids:
    df.update({g for r in refs[k] for n in range(1, 5) for g in ngrams(r, n)})

  def tfidf(sentence, n):
    return {g: c * (np.log(num_images) - np.log(max(1.0, df[g])))
            for g, c in ngrams(sentence, n).items()}

  scores = {}
  for k in ids:
    c = preds[k]
    per_n = []
    for n in range(1, 5):
      gc = tfidf(c, n)
      total = 0.0
      for r in refs[k]:
        gr = tfidf(r, n)
        norm = np.sqrt(sum(v * v for v in gc.values())) * np.sqrt(sum(v * v for v in gr.values()))
        dot = sum(min(v, gr.get(g, 0.0)) * gr.get(g, 0.0) for g, v in gc.items())
        penalty = np.exp(-((len(c.split()) - len(r.split())) ** 2) / (2 * sigma ** 2))
        total += penalty * (dot / norm if norm else dot)
      per_n.append(total / len(refs[k]))
    scores[k] = 10.0 * np.mean(per_n)
  return float(np.mean(list(scores.values()))), scores


def test_cider_d_matches_an_independent_implementation():
  refs = {"dog": CORPUS_REFS["dog"], "cat": CORPUS_REFS["cat"]}
  preds = {"dog": CORPUS_PREDS["dog"], "cat": CORPUS_PREDS["cat"]}
  corpus, per_image = captions.coco_caption_scores(preds, refs, metrics=("CIDEr",))
  expected, expected_per_image = _cider_d(preds, refs)
  assert corpus["CIDEr"] == pytest.approx(expected, rel=1e-9)
  for k in refs:
    assert per_image[k]["CIDEr"] == pytest.approx(expected_per_image[k], rel=1e-9)
  assert 0.0 < corpus["CIDEr"] < 10.0


def test_spice_absence_is_logged(caplog):
  captions._warn_spice_unavailable.cache_clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    scores, _ = captions.coco_caption_scores({0: "a dog"}, {0: ["a dog"]}, metrics=("Bleu",))
  assert scores["SPICE"] is None
  assert any("SPICE not computed" in r.getMessage() for r in caplog.records)


def test_seqio_caption_metric_decodes_bytes_and_keeps_numbers(monkeypatch):
  full = captions.coco_caption_scores
  # Skip METEOR's start-up here; the fixture above covers it.
  monkeypatch.setattr(captions, "coco_caption_scores",
                      lambda p, r: full(p, r, metrics=("Bleu", "CIDEr")))
  metrics = captions.coco_caption_metric([[b"a red car", "a car"], np.array([b"two dogs"])],
                                         [b"a red car", "two dogs"])
  assert set(metrics) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
  assert all(isinstance(v, float) for v in metrics.values())
  assert metrics["Bleu_1"] == pytest.approx(1.0, abs=1e-6)


def test_meteor_watchdog_turns_a_stall_into_an_error():
  # 0.5 s is far less than METEOR's start-up: the watchdog kills it, and the call fails, not hangs.
  with pytest.raises(RuntimeError, match="METEOR"):
    captions._meteor({0: ["a dog"]}, {0: ["a dog"]}, timeout_s=0.5)


def test_missing_java_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))
  with pytest.raises(RuntimeError, match="java"):
    captions.coco_caption_metrics({0: "a dog"}, {0: ["a dog"]})


def test_caption_inputs_are_checked():
  with pytest.raises(ValueError, match="ids"):
    captions.coco_caption_metrics({0: "a dog"}, {1: ["a dog"]})
  with pytest.raises(ValueError, match="without references"):
    captions.coco_caption_metrics({0: "a dog"}, {0: []})
  with pytest.raises(ValueError, match="unknown"):
    captions.score_tokenized({0: ["a dog"]}, {0: ["a dog"]}, metrics=("SPICE",))


# --- Classification -------------------------------------------------------------------------------

def test_snli_ve_accuracy_per_class_and_confusion():
  labels = ["entailment", "entailment", "neutral", "contradiction", "contradiction", "neutral"]
  preds = ["entailment", "neutral", " Neutral\n", "contradiction", "maybe", "entailment"]
  result = classification.classification_metrics(preds, labels, classification.SNLI_VE_CLASSES)
  assert result["accuracy"] == pytest.approx(100 * 3 / 6)
  assert result["per_class_accuracy"] == pytest.approx(
      {"entailment": 50.0, "neutral": 50.0, "contradiction": 50.0})
  assert result["confusion_columns"] == ["entailment", "neutral", "contradiction", "<other>"]
  assert result["confusion_matrix"] == [[1, 1, 0, 0],
                                        [1, 1, 0, 0],
                                        [0, 0, 1, 1]]


def test_nlvr2_metric_takes_booleans_and_bytes():
  metrics = classification.nlvr2_metric([True, b"False", "true", False],
                                        ["true", "false", "false", "yes"])
  assert metrics["accuracy"] == pytest.approx(50.0)
  assert metrics["accuracy_true"] == pytest.approx(50.0)
  assert metrics["accuracy_false"] == pytest.approx(50.0)
  assert metrics["confusion/true->true"] == 1.0
  assert metrics["confusion/true->false"] == 1.0
  assert metrics["confusion/false-><other>"] == 1.0
  assert sum(v for k, v in metrics.items() if k.startswith("confusion/")) == 4.0


def test_classification_rejects_unknown_labels_and_skips_empty_classes():
  with pytest.raises(ValueError, match="label"):
    classification.snli_ve_metric(["maybe"], ["neutral"])
  metrics = classification.snli_ve_metric(["neutral"], ["neutral"])
  assert metrics["accuracy"] == 100.0 and "accuracy_entailment" not in metrics
