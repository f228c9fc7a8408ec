"""The shapes world's downstream benchmarks: written in the official formats, loaded by the
official readers, and every answer and label right for the scenes (checked here with a parser of
their own against the ground truth in scenes.jsonl); label balance; determinism from the seed."""
import collections
import filecmp
import json
import os
import re

import pytest
import tensorflow_datasets as tfds

import tasks  # noqa: F401  (registers the builders)
from tasks import build, shapes_downstream, shapes_world
from tasks.downstream import nocaps, snli_ve, vqa_v2

TRAIN, EVAL = 200, 40
COLOUR = "|".join(shapes_world.COLOURS)
SHAPE = "|".join(shapes_world.SHAPES)
# A description: optional size, optional colour, a shape or "shape", maybe plural.
DESC = rf"(?:(?:small|large) )?(?:(?:{COLOUR}) )?(?:{SHAPE}|shape)(?:es|s)?"
REL = "to the left of|to the right of|above|below"
NUMBER = "|".join(shapes_downstream.NUMBER_WORDS)
_AXES = {"to the left of": ("x", -1), "to the right of": ("x", 1), "above": ("y", -1),
         "below": ("y", 1)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Raw files and TFDS datasets of every benchmark, through the CLI."""
  out_dir = str(tmp_path_factory.mktemp("shapes_raw"))
  data_dir = str(tmp_path_factory.mktemp("shapes_tfds"))
  build.main(["--data_dir", data_dir, "shapes_downstream", "--out_dir", out_dir,
              "--train", str(TRAIN), "--eval", str(EVAL), "--workers", "0"])
  return out_dir, data_dir


def _scenes(out_dir: str, benchmark: str) -> dict[str, dict]:
  with open(os.path.join(out_dir, benchmark, "scenes.jsonl")) as f:
    return {r["key"]: r for r in map(json.loads, f)}


def _read(data_dir: str, name: str, split: str) -> list[dict]:
  builder = tfds.builder(name, data_dir=data_dir)
  decoders = {k: tfds.decode.SkipDecoding() for k, v in builder.info.features.items()
              if isinstance(v, tfds.features.Image)}
  return list(tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders)))


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else value


def _matching(desc: str, scene: dict) -> list[dict]:
  """The scene's objects that a description ("large red circle", "shapes", ...) applies to."""
  words = desc.split()
  noun = words[-1]
  for singular in (noun, noun[:-1], noun[:-2]):  # "circle", "circles", "crosses"
    if singular in shapes_world.SHAPES + ("shape",):
      noun = singular
      break
  return [o for o in scene["objects"]
          if all(w in (o["size"], o["colour"]) for w in words[:-1])
          and noun in (o["shape"], "shape")]


def _the(desc: str, scene: dict) -> dict:
  """The one object "the <desc>" refers to (a definite description must be unambiguous)."""
  (obj,) = _matching(desc, scene)
  return obj


def _signed(a: dict, b: dict, relation: str) -> float:
  """> 0 when `a` is `relation` of `b`."""
  axis, sign = _AXES[relation]
  return sign * (a[axis] - b[axis])


def _some(a: str, relation: str, b: str, scenes) -> tuple[bool, bool]:
  """(some a is relation of some other b, every a is the opposite of every other b)."""
  values = [_signed(x, y, relation) for s in scenes for x in _matching(a, s)
            for y in _matching(b, s) if x is not y]
  return any(v > 0 for v in values), all(v < 0 for v in values)


def _held_out_named(text: str) -> bool:
  return any(re.search(rf"\b{c} {s}", text) for c, s in shapes_world.HELD_OUT_PAIRS)


def _names_only_what_is_there(caption: str, scene: dict) -> bool:
  words = set(re.findall(r"[a-z]+", caption))
  return (words & set(shapes_world.COLOURS) <= {o["colour"] for o in scene["objects"]} and
          words & set(shapes_world.SHAPES) <= {o["shape"] for o in scene["objects"]})


def test_everything_loads_through_the_official_readers(built):
  _, data_dir = built
  expected = {
      "coco_karpathy/shapes": {"train": TRAIN + EVAL, "validation": EVAL, "test": EVAL,
                               "compositional": EVAL},
      "nocaps/shapes": {"validation": EVAL},
      "vqa_v2/shapes": {"train": 3 * TRAIN, "validation": 3 * 3 * EVAL},
      "nlvr2/shapes": {"train": TRAIN, "validation": EVAL, "test": EVAL},
      "snli_ve/shapes": {"train": 3 * TRAIN, "validation": 3 * EVAL, "test": 3 * EVAL},
      "snli_ve/shapes_text": {"train": 3 * TRAIN, "validation": 3 * EVAL, "test": 3 * EVAL},
  }
  for name, sizes in expected.items():
    builder = tfds.builder(name, data_dir=data_dir)
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == sizes, name
  example = next(iter(tfds.as_numpy(
      tfds.builder("nlvr2/shapes", data_dir=data_dir).as_dataset(split="validation"))))
  assert example["image_left"].shape == (64, 64, 3)


def test_captions_and_the_compositional_split(built):
  out_dir, data_dir = built
  with open(os.path.join(out_dir, "coco", "dataset_coco.json")) as f:
    karpathy = json.load(f)
  assert collections.Counter(i["split"] for i in karpathy["images"]) == {
      "train": TRAIN, "restval": EVAL, "val": EVAL, "test": EVAL, "compositional": EVAL}
  assert all(len(i["sentences"]) == 5 for i in karpathy["images"])
  scenes = _scenes(out_dir, "coco")
  for image in karpathy["images"]:
    scene = scenes[f"{image['filepath']}/{image['filename']}"]
    held = {(o["colour"], o["shape"]) for o in scene["objects"]} & shapes_world.HELD_OUT_PAIRS
    assert bool(held) == (image["split"] == "compositional")
    assert all(_names_only_what_is_there(s["raw"], scene) for s in image["sentences"])
    if image["split"] != "compositional":
      assert not any(_held_out_named(s["raw"]) for s in image["sentences"])
  for example in _read(data_dir, "coco_karpathy/shapes", "compositional"):
    assert len(example["captions"]) == 5
    # The scene rides along (caption correctness in simvlm_jax.eval), as scenes.jsonl has it.
    objects = scenes[example["file_name"].decode()]["objects"]
    assert json.loads(example["scene"]) == {"objects": objects}

  domains = collections.Counter()
  novel_counts = _scenes(out_dir, "nocaps")
  for example in _read(data_dir, "nocaps/shapes", "validation"):
    scene = novel_counts[f"val/{example['open_images_id'].decode()}.jpg"]
    novel = [(o["colour"], o["shape"]) in shapes_world.HELD_OUT_PAIRS for o in scene["objects"]]
    domain = nocaps.DOMAINS[example["domain"]]
    domains[domain] += 1
    assert domain == ("in-domain" if not any(novel) else
                      "out-domain" if all(novel) else "near-domain")
    assert len(example["captions"]) == 10
    assert json.loads(example["scene"]) == {"objects": scene["objects"]}
    assert all(_names_only_what_is_there(_text(c), scene) for c in example["captions"])
  assert min(domains.values()) >= EVAL // 3


def _vqa_answer(question: str, scene: dict) -> str:
  """The right answer to a question of the generator's kinds, worked out from the scene."""
  patterns = [
      (rf"how many ({DESC}) (?:are there|are in the picture|can you see)\?",
       lambda d: str(len(_matching(d, scene)))),
      (rf"(?:is there an?|are there any) ({DESC})\?",
       lambda d: "yes" if _matching(d, scene) else "no"),
      (rf"is the ({DESC}) (small|large)\?",
       lambda d, v: "yes" if _the(d, scene)["size"] == v else "no"),
      (rf"is the ({DESC}) ({COLOUR})\?",
       lambda d, v: "yes" if _the(d, scene)["colour"] == v else "no"),
      (rf"is the ({DESC}) ({REL}) the ({DESC})\?", lambda a, r, b: (
          "yes" if _signed(_the(a, scene), _the(b, scene), r) > 0 else "no")),
      (rf"what (color|shape|size) is the ({DESC})\?",
       lambda attribute, d: _the(d, scene)["colour" if attribute == "color" else attribute]),
      (rf"what (shape) is ({REL}) the ({DESC})\?|what (color) is the shape ({REL}) the ({DESC})\?",
       None),
      (r"what kind of background is this\?|what does the background look like\?",
       lambda: scene["background"]),
  ]
  for pattern, answer in patterns:
    match = re.fullmatch(pattern, question)
    if match and answer is None:  # the one object clearly in that relation
      attribute, relation, other = [g for g in match.groups() if g]
      anchor = _the(other, scene)
      (obj,) = [o for o in scene["objects"] if o is not anchor and _signed(o, anchor, relation) > 0]
      return obj["colour" if attribute == "color" else "shape"]
    if match:
      return answer(*match.groups())
  raise AssertionError(f"unparsed question {question!r}")


def test_vqa_answers_match_the_scenes(built):
  out_dir, data_dir = built
  scenes = _scenes(out_dir, "coco")
  vocab = vqa_v2.load_answer_vocab("shapes", data_dir)
  assert {"yes", "no", "1", "2"} <= set(vocab)
  types, yes_no, disagreements = collections.Counter(), collections.Counter(), 0
  for split, folder in (("train", "train2014"), ("validation", "val2014")):
    for example in _read(data_dir, "vqa_v2/shapes", split):
      image_id = example["image_id"]
      scene = scenes[f"{folder}/COCO_{folder}_{image_id:012d}.jpg"]
      question, answer = _text(example["question"]), _text(example["multiple_choice_answer"])
      assert _vqa_answer(question, scene) == answer, question
      assert not _held_out_named(question)
      answer_type = _text(example["answer_type"])
      types[answer_type] += 1
      assert answer_type == ("yes/no" if answer in ("yes", "no") else
                             "number" if answer.isdigit() else "other")
      if answer_type == "yes/no":
        yes_no[answer] += 1
      # Ten humans; the right answer is given at least four times, more than any other.
      humans = collections.Counter(_text(a) for a in example["answers"])
      assert sum(humans.values()) == 10 and humans[answer] >= 4
      assert humans.most_common(2)[-1][1] < humans[answer] or len(humans) == 1
      disagreements += len(humans) > 1
      if answer in vocab:
        scores = dict(zip(example["answer_ids"].tolist(), example["answer_scores"].tolist()))
        assert scores[vocab.index(answer)] == 1.0
  total = sum(types.values())
  assert 0.25 < types["yes/no"] / total < 0.5 and 0.05 < types["number"] / total < 0.25
  assert 0.4 < yes_no["yes"] / sum(yes_no.values()) < 0.6
  assert 0.1 < disagreements / total < 0.9  # annotators disagree, but not always


def _nlvr2_truth(sentence: str, left: dict, right: dict) -> tuple[bool, bool]:
  """(can be true, can be false) of a statement about an image pair, from the scenes."""
  scenes = {"left": left, "right": right}
  counts = lambda d: (len(_matching(d, left)), len(_matching(d, right)))  # noqa: E731
  number = lambda word: shapes_downstream.NUMBER_WORDS.index(word)  # noqa: E731
  patterns = [
      (rf"(?:both images contain|there is) an? ({DESC})(?: in each image)?",
       lambda d: min(counts(d)) > 0),
      (rf"(?:exactly one image contains|only one of the images has) an? ({DESC})",
       lambda d: (counts(d)[0] > 0) != (counts(d)[1] > 0)),
      (rf"the (left|right) image contains an? ({DESC})",
       lambda side, d: len(_matching(d, scenes[side])) > 0),
      (rf"there is an? ({DESC}) in the (left|right) image",
       lambda d, side: len(_matching(d, scenes[side])) > 0),
      (rf"(?:the images contain|there (?:is|are) exactly) ({NUMBER}) ({DESC}) in total",
       lambda n, d: sum(counts(d)) == number(n)),
      (rf"(?:each image contains|both images show) exactly ({NUMBER}) ({DESC})",
       lambda n, d: counts(d) == (number(n), number(n))),
      (rf"the (left|right) image has (more|fewer) ({DESC}) than the (?:left|right) image",
       lambda side, more, d: (len(_matching(d, scenes[side])) - len(_matching(
           d, scenes["right" if side == "left" else "left"]))) * (1 if more == "more" else -1) > 0),
  ]
  for pattern, truth in patterns:
    match = re.fullmatch(pattern, sentence)
    if match:
      value = truth(*match.groups())
      return value, not value
  match = re.fullmatch(
      rf"(?:in at least one image there is|one of the images shows) an? ({DESC}) ({REL}) "
      rf"an? ({DESC})", sentence)
  assert match, f"unparsed statement {sentence!r}"
  return _some(*match.groups(), [left, right])


def test_nlvr2_labels_hold_for_the_image_pairs(built):
  out_dir, data_dir = built
  scenes = _scenes(out_dir, "nlvr2")
  labels, statements = collections.Counter(), set()
  for split, folder in (("train", None), ("validation", "dev"), ("test", "test1")):
    for example in _read(data_dir, "nlvr2/shapes", split):
      identifier, sentence = _text(example["identifier"]), _text(example["sentence"])
      pair = identifier.rsplit("-", 1)[0]
      index = int(pair.split("-")[1])
      where = f"train/{index % 100}" if folder is None else folder
      left, right = (scenes[f"images/{where}/{pair}-img{side}.png"] for side in (0, 1))
      can_be_true, can_be_false = _nlvr2_truth(sentence, left, right)
      assert can_be_true if example["label"] else can_be_false, (sentence, example["label"])
      assert not _held_out_named(sentence)
      labels[bool(example["label"])] += 1
      statements.add(re.sub(DESC, "X", sentence))
  assert labels[True] == labels[False]  # one true and one false statement per pair
  assert len(statements) >= 10  # many kinds of statement


def _nli_truth(hypothesis: str, scene: dict) -> str:
  """The label of a hypothesis about a scene, from the scene."""
  neutral = (rf"the ({DESC}) (?:is made of (?:{'|'.join(shapes_downstream.MATERIALS)})|"
             rf"is (?:{'|'.join(shapes_downstream.PROPERTIES)})|"
             rf"was drawn (?:{'|'.join(shapes_downstream.DRAWN)}))")
  match = re.fullmatch(neutral, hypothesis)
  if match:
    _the(match[1], scene)  # about an object that is there
    return "neutral"
  count = lambda d: len(_matching(d, scene))  # noqa: E731
  patterns = [
      (rf"(?:there is|the picture shows) an? ({DESC})", lambda d: count(d) > 0),
      (rf"(?:there are no|the picture has no) ({DESC})", lambda d: count(d) == 0),
      (rf"there (?:is|are) exactly ({NUMBER}) ({DESC})",
       lambda n, d: count(d) == shapes_downstream.NUMBER_WORDS.index(n)),
      (rf"the ({DESC}) is (small|large)", lambda d, v: _the(d, scene)["size"] == v),
      (rf"the ({DESC}) is ({COLOUR})", lambda d, v: _the(d, scene)["colour"] == v),
      (r"the background is (\w+)", lambda v: scene["background"] == v),
  ]
  for pattern, truth in patterns:
    match = re.fullmatch(pattern, hypothesis)
    if match:
      return "entailment" if truth(*match.groups()) else "contradiction"
  match = re.fullmatch(rf"an? ({DESC}) is ({REL}) an? ({DESC})", hypothesis)
  assert match, f"unparsed hypothesis {hypothesis!r}"
  some, none = _some(*match.groups(), [scene])
  assert some != none
  return "entailment" if some else "contradiction"


def _premise_matches(premise: str, scene: dict) -> bool:
  """The description lists every object and the background, and states only true relations."""
  first, *relations = premise.split(". ")
  listed = re.findall(rf"an? (small|large) ({COLOUR}) ({SHAPE})", first)
  objects = sorted((o["size"], o["colour"], o["shape"]) for o in scene["objects"])
  for relation in relations:
    match = re.fullmatch(rf"the ({DESC}) is ({REL}) the ({DESC})(?: and ({REL}) it)?", relation)
    a, b = _the(match[1], scene), _the(match[3], scene)
    assert all(_signed(a, b, r) > 0 for r in (match[2], match[4]) if r), relation
  return sorted(listed) == objects and first.endswith(f"on a {scene['background']} background")


@pytest.mark.parametrize("name, benchmark", [("snli_ve/shapes", "snli_ve"),
                                             ("snli_ve/shapes_text", "text_nli")])
def test_nli_labels_hold_for_the_premises(built, name, benchmark):
  out_dir, data_dir = built
  scenes = _scenes(out_dir, benchmark)
  per_premise = collections.defaultdict(list)
  for split in ("train", "validation", "test"):
    for example in _read(data_dir, name, split):
      pair_id = _text(example["pair_id"])
      caption_id = pair_id[:pair_id.rindex("r1")]
      key = (f"flickr30k_images/{_text(example['flickr30k_id'])}.jpg" if "image" in example
             else caption_id)
      scene, hypothesis = scenes[key], _text(example["hypothesis"])
      label = snli_ve.LABELS[example["label"]]
      assert _nli_truth(hypothesis, scene) == label, (hypothesis, label)
      assert _premise_matches(_text(example["premise_text"]), scene)
      assert not _held_out_named(hypothesis + " " + _text(example["premise_text"]))
      per_premise[caption_id].append(label)
  assert ("image" in example) == (benchmark == "snli_ve")
  # SNLI's design: one hypothesis of each label per premise.
  assert all(sorted(labels) == sorted(snli_ve.LABELS) for labels in per_premise.values())


def test_cli_keeps_what_is_written(built, capsys):
  out_dir, data_dir = built
  build.main(["--data_dir", data_dir, "shapes_downstream", "--out_dir", out_dir,
              "--train", str(TRAIN), "--eval", str(EVAL)])
  output = capsys.readouterr().out
  assert "already written" in output and "already built" in output


def _files(root: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, names in os.walk(root) for f in names)


def test_deterministic_from_the_seed_serial_or_parallel(tmp_path):
  sizes = shapes_downstream.default_sizes(train=60, evaluation=24)  # >= 256 examples: parallel
  runs = {"a": (0, 0), "b": (0, 2), "c": (1, 0)}  # name: (seed, workers)
  for name, (seed, workers) in runs.items():
    shapes_downstream.write_benchmarks(str(tmp_path / name), seed=seed, sizes=sizes,
                                       num_workers=workers)
  files = _files(tmp_path / "a")
  assert files == _files(tmp_path / "b") == _files(tmp_path / "c") and len(files) > 400
  _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
  assert not mismatch and not errors
  _, mismatch, _ = filecmp.cmpfiles(tmp_path / "a", tmp_path / "c", files, shallow=False)
  assert len(mismatch) > 0.9 * len(files)
