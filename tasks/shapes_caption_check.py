"""Caption correctness in the shapes world: what a caption says, checked against the scene.

CIDEr rewards n-grams shared with the references; it cannot tell "a large green diamond" from
"a large green triangle" by more than a word. The shapes world knows every scene, so a caption can
be checked instead. A caption makes claims:
  - per object it names ("a small red circle", "a big square that is blue", "triangles"):
    the shape exists; its stated colour is true of an object of that shape; its stated size is
    true of an object of that shape (and colour, when that is stated and true);
  - per count it states ("two shapes", "three objects", "a single ..."): the number of objects.
Two numbers per caption: `precision`, the fraction of its claims that are true, and `recall`, the
fraction of the scene's objects it names correctly (shape, and colour and size where stated); and
one verdict: `right_about_colour_and_shape`, it names an object and every shape and colour it
states is true (what a reader checks first). Relations ("to the left of") and the background are
not checked.
"""
import dataclasses
import json
import re
from typing import Iterable, Mapping, Optional, Sequence

from tasks import shapes_world

_SHAPE_WORDS = {**{s: s for s in shapes_world.SHAPES}, **{s + "s": s for s in shapes_world.SHAPES},
                "crosses": "cross"}
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large",
               "big": "large"}
_COUNT_WORDS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five"))}
_COUNT_NOUNS = ("shape", "shapes", "object", "objects")


@dataclasses.dataclass(frozen=True)
class Mention:
  shape: str
  colour: Optional[str] = None
  size: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class CaptionScore:
  claims: int
  true_claims: int
  objects: int
  named_objects: int
  colour_shape_claims: int  # the claims about shape and colour, a part of `claims`
  true_colour_shape_claims: int

  @property
  def precision(self) -> float:
    """Fraction of the caption's claims that are true (1.0 for a caption that claims nothing)."""
    return self.true_claims / self.claims if self.claims else 1.0

  @property
  def recall(self) -> float:
    """Fraction of the scene's objects that the caption names correctly."""
    return self.named_objects / self.objects if self.objects else 1.0

  @property
  def right_about_colour_and_shape(self) -> bool:
    """Names at least one object, and every shape and colour it states is true."""
    return 0 < self.colour_shape_claims == self.true_colour_shape_claims


def parse(caption: str) -> tuple[list[Mention], list[int]]:
  """The objects a caption names (with the colour and size it gives them) and the counts it
  states."""
  words = re.findall(r"[a-z]+", caption.lower())
  mentions: list[Mention] = []
  counts: list[int] = []
  colour = size = None
  skip = 0  # words already read as a post-modifier
  for i, word in enumerate(words):
    if i < skip:
      continue
    if word in _SIZE_WORDS:
      size = _SIZE_WORDS[word]
    elif word in shapes_world.COLOURS:
      colour = word
    elif word in _SHAPE_WORDS:
      # Post-modifiers: "a big square that is blue", "a small star in pink".
      for pattern in (["that", "is"], ["in"]):
        after = words[i + 1:i + 2 + len(pattern)]
        if colour is None and after[:-1] == pattern and after[-1:] and \
            after[-1] in shapes_world.COLOURS:
          colour, skip = after[-1], i + 1 + len(after)
          break
      mentions.append(Mention(_SHAPE_WORDS[word], colour, size))
      colour = size = None
    elif word in _COUNT_WORDS and words[i + 1:i + 2] and words[i + 1] in _COUNT_NOUNS:
      counts.append(_COUNT_WORDS[word])
      colour = size = None
    elif word == "single" and i > 0 and words[i - 1] == "a":
      counts.append(1)
    elif word not in ("a", "an", "the"):
      colour = size = None  # an attribute binds only within its noun phrase
  return mentions, counts


def score(caption: str, objects: Mapping[str, Sequence[str]]) -> CaptionScore:
  """`objects`: the scene as stored, {"colour": [...], "shape": [...], "size": [...]}."""
  scene = [dict(colour=c, shape=s, size=z) for c, s, z in
           zip(objects["colour"], objects["shape"], objects["size"])]
  mentions, counts = parse(caption)
  claims = true = colour_shape_true = 0
  for m in mentions:
    candidates = [o for o in scene if o["shape"] == m.shape]
    claims += 1
    true += bool(candidates)
    colour_shape_true += bool(candidates)
    if m.colour is not None:
      claims += 1
      coloured = [o for o in candidates if o["colour"] == m.colour]
      true += bool(coloured)
      colour_shape_true += bool(coloured)
      candidates = coloured or candidates
    if m.size is not None:
      claims += 1
      true += any(o["size"] == m.size for o in candidates)
  for n in counts:
    claims += 1
    true += n == len(scene)
  named = sum(any(m.shape == o["shape"] and m.colour in (None, o["colour"]) and
                  m.size in (None, o["size"]) for m in mentions) for o in scene)
  colour_shape_claims = len(mentions) + sum(m.colour is not None for m in mentions)
  return CaptionScore(claims, true, len(scene), named, colour_shape_claims, colour_shape_true)


def corpus_score(captions: Iterable[str], scenes: Iterable[Mapping[str, Sequence[str]]]) -> dict:
  """Claims and objects pooled over captions: {"precision": %, "recall": %, "right": % of the
  captions right about colour and shape, "captions": n, "claims": n}. Captions that claim nothing
  (e.g. empty ones) leave precision undefined: None."""
  scores = [score(c, s) for c, s in zip(captions, scenes)]
  claims = sum(s.claims for s in scores)
  objects = sum(s.objects for s in scores)
  return {"precision": 100.0 * sum(s.true_claims for s in scores) / claims if claims else None,
          "recall": 100.0 * sum(s.named_objects for s in scores) / objects if objects else 0.0,
          "right": 100.0 * sum(s.right_about_colour_and_shape for s in scores) / len(scores)
          if scores else 0.0,
          "captions": len(scores), "claims": claims}


def summary(pooled: dict) -> str:
  """One line for a `corpus_score`: what share of the claims is true, of the objects named."""
  claims = (f"{pooled['precision']:.0f}% of the {pooled['claims']} colours, shapes, sizes and "
            "counts stated are true" if pooled["precision"] is not None
            else "no colour, shape, size or count is stated")
  right = ("" if pooled.get("right") is None else  # scores saved before it was counted lack it
           f"; {pooled['right']:.0f}% of the captions are right about every colour and shape they "
           "state")
  return f"{claims}; {pooled['recall']:.0f}% of the objects are named{right}"


def caption_correctness(targets: Sequence[Mapping], predictions: Sequence[str]) -> dict:
  """The shapes world's caption tasks' metric fn beside the official caption metrics:
  {"caption_correctness": `corpus_score`} of the captions whose example carries a scene.
  seqio's (targets, predictions) signature, but `scores_examples`: `simvlm_jax.evaluators` gives
  each example's pass-through features (its scene) as its target."""
  examples = targets
  def text(x):
    return x.decode("utf-8") if isinstance(x, bytes) else str(x or "")
  known = [i for i, example in enumerate(examples) if text(example.get("scene"))]
  if not known:
    return {}
  return {"caption_correctness": corpus_score(
      [predictions[i] for i in known], [scene_from_json(text(examples[i]["scene"])) for i in known])}


caption_correctness.scores_examples = True


def scene_from_json(text: str) -> dict[str, list[str]]:
  """The downstream benchmarks' scene feature ({"objects": [{"colour", "shape", "size", ...}]},
  `tasks.downstream.common`) as `score` takes it."""
  objects = json.loads(text)["objects"]
  return {key: [o[key] for o in objects] for key in ("colour", "shape", "size")}
