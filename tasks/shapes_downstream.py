"""The shapes world's downstream benchmarks, written to disk in the official formats.

  write_benchmarks(out_dir, seed=0, sizes=default_sizes(train=4000, evaluation=400), image_size=64)

writes under out_dir exactly what the official readers (tasks/downstream/) read:

  coco/      dataset_coco.json (Karpathy-style: train, restval, val, test and compositional, whose
             images all hold a held-out colour-shape pair), train2014/ val2014/ (JPEG), 5 captions
  nocaps/    nocaps_val_4500_captions.json, val/: 10 captions per image; in-domain (training
             pairs only), near-domain (held-out and training pairs), out-domain (held-out only)
  vqa_v2/    v2_OpenEnded_mscoco_{train,val}2014_questions.json, v2_mscoco_*_annotations.json:
             questions about the coco/ images (train2014 -> train; val2014 except the
             compositional images -> val): yes/no (balanced), number ("how many ..."), other
             (colour, shape, size, relation, background), ten human answers each with synonyms,
             number words and occasional wrong answers (the canonical answer is always the most
             frequent; at most three are wrong)
  nlvr2/     {train,dev,test1}.json, images/{train/<directory>,dev,test1}/ (PNG): two statements
             per image pair, one true and one false
  snli_ve/   snli_ve_{train,dev,test}.jsonl, flickr30k_images/: per image one entailed, one
             neutral (an attribute no image shows: material, weight, ...) and one contradicted
             hypothesis; sentence1 is a complete description of the scene
  text_nli/  snli_ve_{train,dev,test}.jsonl without images, same hypotheses, over other scenes:
             the text-only NLI set of the cross-modality transfer experiment (every label is
             decided by sentence1 alone)
  <each>/scenes.jsonl   not part of any format: the ground-truth scene of every image (or premise),
                        keyed by its file (or captionID), for checks and error analysis

Only training colour-shape pairs are named in any text except the captions of the compositional
and NoCaps images. Relations are only stated, asked or judged where they hold clearly
(`relation`): the same margin decides them in images and in descriptions.

Every file is a function of (seed, sizes, image_size); example i of a split depends on the seed,
the benchmark, the split and i only, so larger sizes write a superset.
"""
import dataclasses
import functools
import json
import os
import re
from typing import Optional, Sequence

import numpy as np

from tasks import shapes_world
from tasks.shapes_builders import _parallel_map  # pylint: disable=protected-access
from tasks.shapes_world import COLOURS, SHAPES, SIZES, BACKGROUNDS, TRAIN_PAIRS, HELD_OUT_PAIRS

NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")
NLI_LABELS = ("entailment", "neutral", "contradiction")
VQA_TYPE_WEIGHTS = {"yes/no": 0.38, "number": 0.12, "other": 0.5}  # as in VQA v2
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven")  # 2 x 3 objects + 1
# A relation holds clearly when the centres are this far apart along its axis (the caption
# grammar's margin too); within the margin either way it is undecided and never used.
RELATION_MARGIN = 0.12
RELATIONS = {"left": ("to the left of", "x", -1), "right": ("to the right of", "x", 1),
             "above": ("above", "y", -1), "below": ("below", "y", 1)}
# Things no image (and no scene description) decides: the neutral hypotheses.
MATERIALS = ("wood", "paper", "metal", "glass", "plastic", "clay")
PROPERTIES = ("heavy", "warm", "cold", "wet", "hollow", "expensive", "fragile", "sticky")
DRAWN = ("first", "last", "by hand", "by a child", "yesterday")

_BENCHMARK_IDS = {"coco": 10, "nocaps": 11, "vqa_v2": 12, "nlvr2": 13, "snli_ve": 14,
                  "text_nli": 15}
_SPLIT_IDS = {"train": 0, "restval": 1, "val": 2, "test": 3, "compositional": 4, "dev": 5,
              "test1": 6}
_SCENE, _RENDER, _TEXT = 0, 1, 2  # what a random stream is for
_VQA_SPLITS = {"train2014": ("train",), "val2014": ("restval", "val", "test")}
_SYNONYMS = {
    "red": ("dark red",), "orange": ("light orange",), "yellow": ("gold",),
    "green": ("dark green",), "cyan": ("light blue", "turquoise", "teal"),
    "blue": ("dark blue", "navy"), "purple": ("violet", "lavender"),
    "pink": ("light pink", "magenta"),
    "circle": ("round", "dot"), "square": ("rectangle", "box"), "diamond": ("rhombus",),
    "cross": ("plus", "plus sign"), "star": ("asterisk",), "triangle": ("pyramid",),
    "large": ("big",), "small": ("little", "tiny"),
    "striped": ("stripes", "lines"), "noisy": ("blotchy", "spotted"), "gradient": ("fade",),
}


def default_sizes(train: int = 4000, evaluation: int = 400) -> dict[str, dict[str, int]]:
  """Examples per split: images (coco, nocaps, snli_ve), image pairs (nlvr2), premises (text_nli).

  `train` images per training split (NLVR2: half as many pairs), `evaluation` per other split.
  VQA asks its questions about the coco images, so it has no sizes of its own.
  """
  return {
      "coco": {"train": train, "restval": evaluation, "val": evaluation, "test": evaluation,
               "compositional": evaluation},
      "nocaps": {"val": evaluation},
      "nlvr2": {"train": train // 2, "dev": evaluation // 2, "test1": evaluation // 2},
      "snli_ve": {"train": train, "dev": evaluation, "test": evaluation},
      "text_nli": {"train": train, "dev": evaluation, "test": evaluation},
  }


def _rng(seed: int, benchmark: str, split: str, index: int, purpose: int,
         side: int = 0) -> np.random.Generator:
  return np.random.default_rng(
      [seed, _BENCHMARK_IDS[benchmark], _SPLIT_IDS[split], index, purpose, side])


def scene(seed: int, benchmark: str, split: str, index: int, side: int = 0) -> shapes_world.Scene:
  """The scene of example `index` (side 1: the right image of an NLVR2 pair).

  Training colour-shape pairs only, except the compositional split (a held-out pair in every
  scene) and NoCaps, whose domain cycles with the index: in-, near-, out-domain.
  """
  rng = _rng(seed, benchmark, split, index, _SCENE, side)
  if benchmark != "nocaps":
    return shapes_world.sample_scene(rng, held_out=split == "compositional")
  domain = NOCAPS_DOMAINS[index % 3]
  if domain == "in-domain":
    return shapes_world.sample_scene(rng)
  while True:  # held-out scenes, until all (out-domain) or not all (near-domain) pairs are novel
    candidate = shapes_world.sample_scene(rng, held_out=True)
    if all((o.colour, o.shape) in HELD_OUT_PAIRS for o in candidate.objects) == (
        domain == "out-domain"):
      return candidate


# ------------------------------------------------------------------------------------------------
# File names and ids, as the official releases spell them.


def _coco_id(split: str, index: int) -> int:
  return _SPLIT_IDS[split] * 1_000_000 + index + 1


def _coco_folder(split: str) -> str:
  return "train2014" if split == "train" else "val2014"


def _flickr_id(split: str, index: int) -> str:
  return str(1_000_000_000 + _SPLIT_IDS[split] * 10_000_000 + index)


def _image_files(benchmark: str, split: str, index: int) -> list[str]:
  """The image files of an example, relative to its benchmark's folder (NLVR2: left, right)."""
  if benchmark == "coco":
    folder = _coco_folder(split)
    return [f"{folder}/COCO_{folder}_{_coco_id(split, index):012d}.jpg"]
  if benchmark == "nocaps":
    return [f"val/{index:016x}.jpg"]
  if benchmark == "nlvr2":
    folder = f"train/{index % 100}" if split == "train" else split  # train: <directory>
    return [f"images/{folder}/{split}-{index}-0-img{side}.png" for side in (0, 1)]
  if benchmark == "snli_ve":
    return [f"flickr30k_images/{_flickr_id(split, index)}.jpg"]
  return []  # text_nli


def _scene_record(key: str, s: shapes_world.Scene) -> dict:
  return {"key": key, "background": s.background,
          "objects": [{"colour": o.colour, "shape": o.shape, "size": o.size, "x": o.x, "y": o.y}
                      for o in s.objects]}


# ------------------------------------------------------------------------------------------------
# Describing scenes.


@dataclasses.dataclass(frozen=True)
class Desc:
  """A description of objects by any of their attributes, e.g. "large red circle", "red shape"."""
  size: Optional[str] = None
  colour: Optional[str] = None
  shape: Optional[str] = None

  def matches(self, obj: shapes_world.ShapeObject) -> bool:
    return ((self.size is None or self.size == obj.size) and
            (self.colour is None or self.colour == obj.colour) and
            (self.shape is None or self.shape == obj.shape))

  def count(self, s: shapes_world.Scene) -> int:
    return sum(self.matches(o) for o in s.objects)

  def text(self, plural: bool = False) -> str:
    noun = self.shape or "shape"
    if plural:
      noun += "es" if noun.endswith("s") else "s"
    return " ".join(w for w in (self.size, self.colour, noun) if w)


def _a(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick(rng: np.random.Generator, options: Sequence):
  return options[rng.integers(len(options))]


def _obj(s: shapes_world.Scene, rng: np.random.Generator) -> shapes_world.ShapeObject:
  return s.objects[rng.integers(len(s.objects))]


def _partial_desc(size: str, colour: str, shape: str, rng: np.random.Generator) -> Desc:
  """A random non-empty subset of the three attributes."""
  while True:
    keep = rng.random(3) < (0.35, 0.6, 0.75)
    if keep.any():
      return Desc(*(value if k else None for value, k in zip((size, colour, shape), keep)))


def _desc_of(obj: shapes_world.ShapeObject, rng: np.random.Generator) -> Desc:
  return _partial_desc(obj.size, obj.colour, obj.shape, rng)


def _random_desc(rng: np.random.Generator) -> Desc:
  """Any description from the training world (never a held-out colour-shape pair)."""
  colour, shape = _pick(rng, TRAIN_PAIRS)
  return _partial_desc(_pick(rng, SIZES), colour, shape, rng)


def _reference(obj, s: shapes_world.Scene, rng: np.random.Generator,
               without: str = "") -> Optional[Desc]:
  """A short description that picks out `obj` alone in `s`, not using attribute `without`."""
  options = [Desc(shape=obj.shape), Desc(colour=obj.colour), Desc(obj.size, None, obj.shape),
             Desc(obj.size, obj.colour), Desc(None, obj.colour, obj.shape),
             Desc(obj.size, obj.colour, obj.shape)]
  unique = [d for d in options if getattr(d, without, None) is None and d.count(s) == 1]
  return _pick(rng, unique[:2]) if unique else None


def relation(a: shapes_world.ShapeObject, b: shapes_world.ShapeObject, name: str) -> Optional[bool]:
  """Whether `a` is `name` ("left", "right", "above", "below") of `b`: None when undecided."""
  _, axis, sign = RELATIONS[name]
  distance = sign * (getattr(a, axis) - getattr(b, axis))
  if distance > RELATION_MARGIN:
    return True
  return False if distance < -RELATION_MARGIN else None


def _some_relation(a: Desc, name: str, b: Desc, scenes: Sequence) -> Optional[bool]:
  """Whether some `a` is `name` of some other `b` in any of `scenes` (None: undecided)."""
  values = [relation(x, y, name) for s in scenes for x in s.objects for y in s.objects
            if x is not y and a.matches(x) and b.matches(y)]
  if any(values):
    return True
  return None if None in values else False


def _count_phrase(n: int, d: Desc) -> str:
  return f"{NUMBER_WORDS[n]} {d.text(plural=n != 1)}"


def describe(s: shapes_world.Scene) -> str:
  """A complete description: every object, the background and every clear relation."""
  names = [f"{o.colour} {o.shape}" for o in s.objects]
  objects = [_a(f"{o.size} {o.colour} {o.shape}") for o in s.objects]
  listed = objects[0] if len(objects) == 1 else ", ".join(objects[:-1]) + " and " + objects[-1]
  sentences = [f"{listed} on {_a(s.background)} background"]
  for i, a in enumerate(s.objects):
    for j in range(i + 1, len(s.objects)):
      held = [RELATIONS[r][0] for r in RELATIONS if relation(a, s.objects[j], r)]
      if held:
        also = f" and {held[1]} it" if len(held) == 2 else ""
        sentences.append(f"the {names[i]} is {held[0]} the {names[j]}{also}")
  return ". ".join(sentences)


# ------------------------------------------------------------------------------------------------
# VQA.


def _colours_for(shape: str) -> list[str]:
  """The colours a `shape` may be named with: training pairs only."""
  return [c for c in COLOURS if (c, shape) in TRAIN_PAIRS]


def _yes_no_question(s, rng) -> tuple[str, str, str]:
  want = bool(rng.integers(2))
  while True:
    obj, kind = _obj(s, rng), rng.integers(4)
    if kind == 0:  # existence: either answer is always reachable
      d = _desc_of(obj, rng) if want else _random_desc(rng)
      truth = d.count(s) > 0
      question, qtype = _pick(rng, ((f"is there {_a(d.text())}?", "is there a"),
                                    (f"are there any {d.text(plural=True)}?", "are there any")))
    elif kind in (1, 2):  # the size or colour of one object
      attribute = ("size", "colour")[kind - 1]
      ref = _reference(obj, s, rng, without=attribute)
      if ref is None:
        continue
      value = _pick(rng, SIZES if attribute == "size" else _colours_for(obj.shape))
      truth = getattr(obj, attribute) == value
      question, qtype = f"is the {ref.text()} {value}?", "is the"
    else:
      other, name = _obj(s, rng), _pick(rng, list(RELATIONS))
      truth = relation(obj, other, name) if other is not obj else None
      question = (f"is the {_reference(obj, s, rng).text()} {RELATIONS[name][0]} "
                  f"the {_reference(other, s, rng).text()}?")
      qtype = "is the"
    if truth == want:  # an undecided relation (None) never is
      return question, "yes" if want else "no", qtype


def _number_question(s, rng) -> tuple[str, str, str]:
  r = rng.random()
  d = Desc() if r < 0.3 else _desc_of(_obj(s, rng), rng) if r < 0.85 else _random_desc(rng)
  where = _pick(rng, ("are there", "are in the picture", "can you see"))
  return f"how many {d.text(plural=True)} {where}?", str(d.count(s)), "how many"


def _other_question(s, rng) -> tuple[str, str, str]:
  while True:
    kind = rng.choice(5, p=(0.3, 0.25, 0.15, 0.2, 0.1))
    obj = _obj(s, rng)
    if kind == 4:
      question = _pick(rng, ("what kind of background is this?",
                             "what does the background look like?"))
      return question, s.background, " ".join(question.split()[:3])
    if kind == 3:  # the one object in a clear relation to another
      name = _pick(rng, list(RELATIONS))
      values = [relation(o, obj, name) for o in s.objects if o is not obj]
      held = [o for o in s.objects if o is not obj and relation(o, obj, name)]
      if len(held) != 1 or None in values:
        continue
      phrase, ref = RELATIONS[name][0], _reference(obj, s, rng).text()
      if rng.random() < 0.5:
        return f"what shape is {phrase} the {ref}?", held[0].shape, "what shape is"
      return f"what color is the shape {phrase} the {ref}?", held[0].colour, "what color is the"
    attribute = ("colour", "shape", "size")[kind]
    ref = _reference(obj, s, rng, without=attribute)
    if ref is None:
      continue
    word = "color" if attribute == "colour" else attribute
    return f"what {word} is the {ref.text()}?", getattr(obj, attribute), f"what {word} is the"


def _wrong_answer(answer: str, answer_type: str, rng) -> str:
  if answer_type == "yes/no":
    return "no" if answer == "yes" else "yes"
  if answer_type == "number":
    n = int(answer)
    return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
  pool = next(p for p in (COLOURS, SHAPES, SIZES, BACKGROUNDS) if answer in p)
  return _pick(rng, [a for a in pool if a != answer])


def _variants(answer: str) -> tuple[str, ...]:
  """Other ways people give the same answer: synonyms, number words, an article.

  The official metric normalises the prediction but not the human answers, so these score as
  different answers, as such answers do in the real annotations.
  """
  if answer.isdigit():
    return (NUMBER_WORDS[int(answer)],) + (("none",) if answer == "0" else ())
  return _SYNONYMS.get(answer, ()) + ((_a(answer),) if answer in SHAPES else ())


def _human_answers(answer: str, answer_type: str, rng: np.random.Generator) -> list[dict]:
  """Ten annotators: mostly `answer`, some variants and up to three wrong answers.

  At most three variants and three wrong answers, so `answer` itself is given at least four times
  and is always the strict majority answer.
  """
  variants = _variants(answer)
  wrong = min(3, rng.binomial(10, rng.uniform(0, 0.12)))
  varied = min(3, rng.binomial(10 - wrong, rng.uniform(0, 0.3))) if variants else 0
  given = ([(_wrong_answer(answer, answer_type, rng), _pick(rng, ("maybe", "no", "yes")))
            for _ in range(wrong)] +
           [(_pick(rng, variants), _pick(rng, ("yes", "yes", "maybe"))) for _ in range(varied)] +
           [(answer, "yes" if rng.random() < 0.9 else "maybe")
            for _ in range(10 - wrong - varied)])
  return [{"answer": given[i][0], "answer_confidence": given[i][1], "answer_id": k + 1}
          for k, i in enumerate(rng.permutation(10))]


def _vqa_records(s: shapes_world.Scene, image_id: int, rng: np.random.Generator,
                 questions_per_image: int) -> list[tuple[dict, dict]]:
  """(question, annotation) pairs in the VQA v2 formats: distinct questions about one image."""
  makers = {"yes/no": _yes_no_question, "number": _number_question, "other": _other_question}
  records, asked = [], set()
  while len(records) < questions_per_image:
    answer_type = str(rng.choice(list(VQA_TYPE_WEIGHTS), p=list(VQA_TYPE_WEIGHTS.values())))
    question, answer, question_type = makers[answer_type](s, rng)
    if question in asked:
      continue
    asked.add(question)
    question_id = image_id * 1000 + len(records)
    records.append((
        {"image_id": image_id, "question": question, "question_id": question_id},
        {"question_id": question_id, "image_id": image_id, "question_type": question_type,
         "answer_type": answer_type, "multiple_choice_answer": answer,
         "answers": _human_answers(answer, answer_type, rng)}))
  return records


# ------------------------------------------------------------------------------------------------
# NLVR2.


def _nlvr2_statement(left, right, rng, want: bool) -> str:
  scenes, sides = (left, right), ("left", "right")
  objects = left.objects + right.objects
  while True:
    kind = rng.integers(7)
    d = _desc_of(_pick(rng, objects), rng) if rng.random() < 0.75 else _random_desc(rng)
    counts = (d.count(left), d.count(right))
    side = rng.integers(2)
    if kind == 0:
      truth = min(counts) > 0
      text = _pick(rng, (f"both images contain {_a(d.text())}",
                         f"there is {_a(d.text())} in each image"))
    elif kind == 1:
      truth = (counts[0] > 0) != (counts[1] > 0)
      text = _pick(rng, (f"exactly one image contains {_a(d.text())}",
                         f"only one of the images has {_a(d.text())}"))
    elif kind == 2:
      truth = counts[side] > 0
      text = _pick(rng, (f"the {sides[side]} image contains {_a(d.text())}",
                         f"there is {_a(d.text())} in the {sides[side]} image"))
    elif kind == 3:
      n = max(1, sum(counts) + _pick(rng, (0, 0, -1, 1)))
      truth = n == sum(counts)
      be = "is" if n == 1 else "are"
      text = _pick(rng, (f"the images contain {_count_phrase(n, d)} in total",
                         f"there {be} exactly {_count_phrase(n, d)} in total"))
    elif kind == 4:
      n = max(1, counts[side] + _pick(rng, (0, 0, -1, 1)))
      truth = counts == (n, n)
      text = _pick(rng, (f"each image contains exactly {_count_phrase(n, d)}",
                         f"both images show exactly {_count_phrase(n, d)}"))
    elif kind == 5:
      more = rng.random() < 0.5
      truth = counts[side] > counts[1 - side] if more else counts[side] < counts[1 - side]
      text = (f"the {sides[side]} image has {'more' if more else 'fewer'} {d.text(plural=True)} "
              f"than the {sides[1 - side]} image")
    else:
      name, other = _pick(rng, list(RELATIONS)), _desc_of(_pick(rng, objects), rng)
      truth = _some_relation(d, name, other, scenes) if other != d else None
      phrase = f"{_a(d.text())} {RELATIONS[name][0]} {_a(other.text())}"
      text = _pick(rng, (f"in at least one image there is {phrase}",
                         f"one of the images shows {phrase}"))
    if truth == want:
      return text


# ------------------------------------------------------------------------------------------------
# SNLI-VE and the text-only NLI set.


def _hypothesis(s, rng, label: str) -> str:
  if label == "neutral":  # an existing object, and something about it no picture shows
    ref = _reference(_obj(s, rng), s, rng).text()
    return _pick(rng, (f"the {ref} is made of {_pick(rng, MATERIALS)}",
                       f"the {ref} is {_pick(rng, PROPERTIES)}",
                       f"the {ref} was drawn {_pick(rng, DRAWN)}"))
  want = label == "entailment"
  while True:
    obj, kind = _obj(s, rng), rng.integers(7)
    d = _desc_of(obj, rng) if rng.random() < 0.6 else _random_desc(rng)
    if kind == 0:
      truth = d.count(s) > 0
      text = _pick(rng, (f"there is {_a(d.text())}", f"the picture shows {_a(d.text())}"))
    elif kind == 1:
      truth = d.count(s) == 0
      text = _pick(rng, (f"there are no {d.text(plural=True)}",
                         f"the picture has no {d.text(plural=True)}"))
    elif kind == 2:
      n = max(1, d.count(s) + _pick(rng, (0, 0, -1, 1)))
      truth = n == d.count(s)
      text = f"there {'is' if n == 1 else 'are'} exactly {_count_phrase(n, d)}"
    elif kind in (3, 4):  # the size or colour of one object
      attribute = ("size", "colour")[kind - 3]
      ref = _reference(obj, s, rng, without=attribute)
      if ref is None:
        continue
      value = _pick(rng, SIZES if attribute == "size" else _colours_for(obj.shape))
      truth, text = getattr(obj, attribute) == value, f"the {ref.text()} is {value}"
    elif kind == 5:
      name, other = _pick(rng, list(RELATIONS)), _desc_of(_obj(s, rng), rng)
      truth = _some_relation(d, name, other, [s]) if other != d else None
      text = f"{_a(d.text())} is {RELATIONS[name][0]} {_a(other.text())}"
    else:
      background = _pick(rng, BACKGROUNDS)
      truth, text = background == s.background, f"the background is {background}"
    if truth == want:  # an undecided relation (None) never is
      return text


def _nli_records(s: shapes_world.Scene, rng: np.random.Generator, caption_id: str,
                 extra: dict) -> list[dict]:
  """One premise, three hypotheses (one per label, in random order), as SNLI-VE lines."""
  premise = describe(s)
  return [{**extra, "annotator_labels": [label], "captionID": caption_id, "gold_label": label,
           "pairID": f"{caption_id}r1{label[0]}", "sentence1": premise,
           "sentence2": _hypothesis(s, rng, label)}
          for label in rng.permutation(NLI_LABELS).tolist()]


# ------------------------------------------------------------------------------------------------
# Writing it all.


def _example(seed: int, benchmark: str, split: str, out_dir: str, image_size: int,
             questions_per_image: int, index: int) -> dict:
  """Example `index` of a split: writes its images under out_dir, returns its annotations.

  Runs in worker processes, and depends on its arguments only.
  """
  files = _image_files(benchmark, split, index)
  scenes = [scene(seed, benchmark, split, index, side) for side in range(max(1, len(files)))]
  for side, (name, s) in enumerate(zip(files, scenes)):
    image = shapes_world.render(s, image_size, _rng(seed, benchmark, split, index, _RENDER, side))
    path = os.path.join(out_dir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(shapes_world.encode(image, "png" if name.endswith(".png") else "jpeg"))
  rng = _rng(seed, benchmark, split, index, _TEXT)
  keys = files or [f"shapes-{split}-{index}#0"]  # text_nli: its premise's captionID
  out = {"scenes": [_scene_record(key, s) for key, s in zip(keys, scenes)]}
  if benchmark == "coco":
    out["captions"] = shapes_world.captions(scenes[0], rng)
    # VQA asks about the coco images, from a stream of its own; never about compositional ones.
    out["vqa"] = [] if split == "compositional" else _vqa_records(
        scenes[0], _coco_id(split, index), _rng(seed, "vqa_v2", split, index, _TEXT),
        questions_per_image)
  elif benchmark == "nocaps":
    out["captions"] = shapes_world.captions(scenes[0], rng, count=10)
  elif benchmark == "nlvr2":
    out["records"] = []
    for number, label in enumerate(rng.permutation([True, False]).tolist()):
      record = {"identifier": f"{split}-{index}-0-{number}", "label": str(label),
                "sentence": _nlvr2_statement(*scenes, rng, label)}
      if split == "train":
        record["directory"] = str(index % 100)
      out["records"].append(record)
  elif benchmark == "snli_ve":
    image_id = _flickr_id(split, index)
    out["records"] = _nli_records(scenes[0], rng, f"{image_id}.jpg#0", {"Flickr30K_ID": image_id})
  else:
    out["records"] = _nli_records(scenes[0], rng, keys[0], {})
  return out


def _write_json(path: str, data) -> None:
  with open(path, "w") as f:
    f.write(json.dumps(data))  # json.dump(data, f) would use the slow pure-Python encoder


def _write_jsonl(path: str, records: Sequence[dict]) -> None:
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def _write_coco(out_dir: str, examples: dict[str, list[dict]]) -> None:
  images = []
  for split, split_examples in examples.items():
    for index, example in enumerate(split_examples):
      image_id = _coco_id(split, index)
      sentids = [image_id * 10 + k for k in range(len(example["captions"]))]
      images.append({
          "filepath": _coco_folder(split),
          "filename": os.path.basename(_image_files("coco", split, index)[0]),
          "imgid": len(images), "split": split, "cocoid": image_id, "sentids": sentids,
          "sentences": [{"tokens": re.findall(r"[a-z0-9]+", c), "raw": c, "imgid": len(images),
                         "sentid": i} for c, i in zip(example["captions"], sentids)],
      })
  _write_json(os.path.join(out_dir, "dataset_coco.json"), {"images": images, "dataset": "coco"})


def _write_vqa(out_dir: str, coco_examples: dict[str, list[dict]]) -> None:
  for subtype, splits in _VQA_SPLITS.items():
    pairs = [pair for split in splits for example in coco_examples.get(split, ())
             for pair in example["vqa"]]
    _write_json(os.path.join(out_dir, f"v2_OpenEnded_mscoco_{subtype}_questions.json"),
                {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subtype,
                 "questions": [question for question, _ in pairs]})
    _write_json(os.path.join(out_dir, f"v2_mscoco_{subtype}_annotations.json"),
                {"data_type": "mscoco", "data_subtype": subtype,
                 "annotations": [annotation for _, annotation in pairs]})


def _write_nocaps(out_dir: str, examples: dict[str, list[dict]]) -> None:
  images, annotations = [], []
  for index, example in enumerate(examples["val"]):
    file_name = os.path.basename(_image_files("nocaps", "val", index)[0])
    images.append({"id": index, "file_name": file_name, "open_images_id": f"{index:016x}",
                   "domain": NOCAPS_DOMAINS[index % 3]})
    annotations += [{"image_id": index, "id": len(annotations) + k, "caption": caption}
                    for k, caption in enumerate(example["captions"])]
  _write_json(os.path.join(out_dir, "nocaps_val_4500_captions.json"),
              {"licenses": [], "info": {"description": "the shapes world in the NoCaps format"},
               "images": images, "annotations": annotations})


def _write_records(out_dir: str, examples: dict[str, list[dict]], file_name: str) -> None:
  """JSON lines per split (NLVR2's <split>.json, SNLI-VE's snli_ve_<split>.jsonl)."""
  for split, split_examples in examples.items():
    _write_jsonl(os.path.join(out_dir, file_name.format(split=split)),
                 [r for example in split_examples for r in example["records"]])


_WRITERS = {
    "coco": _write_coco,
    "nocaps": _write_nocaps,
    "nlvr2": functools.partial(_write_records, file_name="{split}.json"),
    "snli_ve": functools.partial(_write_records, file_name="snli_ve_{split}.jsonl"),
    "text_nli": functools.partial(_write_records, file_name="snli_ve_{split}.jsonl"),
}


def _planned_example(seed: int, plan: tuple[tuple[str, str, int], ...], out_dir: str,
                     image_size: int, questions_per_image: int, number: int) -> dict:
  """Example `number` of the plan ((benchmark, split, count), ...), counted across all splits.

  So one pool of workers serves every benchmark and split.
  """
  for benchmark, split, count in plan:
    if number < count:
      return _example(seed, benchmark, split, os.path.join(out_dir, benchmark), image_size,
                      questions_per_image, number)
    number -= count
  raise IndexError(number)


def write_benchmarks(out_dir: str, seed: int = 0,
                     sizes: Optional[dict[str, dict[str, int]]] = None, image_size: int = 64,
                     questions_per_image: int = 3, num_workers: Optional[int] = None) -> None:
  """Writes every benchmark under out_dir (see the module docstring).

  sizes: per benchmark, examples per split (default `default_sizes()`); a benchmark given here
  replaces its defaults, and a benchmark mapped to {} is not written (no coco: no vqa_v2 either).
  num_workers: processes that render and annotate examples (default: one per core, as this
    process only collects their results; 0: none, all in this process).
  """
  sizes = {**default_sizes(), **(sizes or {})}
  workers = (os.cpu_count() or 1) if num_workers is None else num_workers
  plan = tuple((benchmark, split, count) for benchmark in _WRITERS
               for split, count in sizes[benchmark].items())
  make = functools.partial(_planned_example, seed, plan, out_dir, image_size, questions_per_image)
  made = iter(_parallel_map(make, sum(count for _, _, count in plan), workers))
  examples = {benchmark: {} for benchmark in _WRITERS}
  for benchmark, split, count in plan:
    examples[benchmark][split] = [next(made) for _ in range(count)]

  for benchmark, writer in _WRITERS.items():
    if not sizes[benchmark]:
      continue
    folder = os.path.join(out_dir, benchmark)
    os.makedirs(folder, exist_ok=True)
    writer(folder, examples[benchmark])
    _write_jsonl(os.path.join(folder, "scenes.jsonl"),
                 [r for split_examples in examples[benchmark].values()
                  for example in split_examples for r in example["scenes"]])
  if sizes["coco"]:
    os.makedirs(os.path.join(out_dir, "vqa_v2"), exist_ok=True)
    _write_vqa(os.path.join(out_dir, "vqa_v2"), examples["coco"])
