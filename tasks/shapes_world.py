"""The embedded "shapes" world: scenes, their rendering, captions and text-only statements.

Pure numpy + PIL (no TensorFlow), so it is cheap to import and fast to run. Every example is a
function of `(seed, split, index)` alone, which makes generation order-free (parallel-safe) and a
bigger dataset a superset of a smaller one.

A scene holds 1 to 3 objects with a colour, a shape, a size and a position. The compositional
held-out split uses colour-shape pairs (`HELD_OUT_PAIRS`) that never appear in the training images
nor in the training text.
"""
import dataclasses
import io
import math
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (245, 130, 20),
    "yellow": (235, 205, 35),
    "green": (44, 160, 44),
    "cyan": (30, 190, 205),
    "blue": (35, 80, 215),
    "purple": (140, 60, 185),
    "pink": (240, 115, 185),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SIZES = ("small", "large")
BACKGROUNDS = ("noisy", "gradient", "striped")

# One held-out colour per shape (six different colours), so every colour and every shape is still
# seen in training; only these combinations are new at evaluation time.
HELD_OUT_PAIRS = frozenset({
    ("red", "triangle"),
    ("orange", "star"),
    ("yellow", "circle"),
    ("green", "cross"),
    ("blue", "diamond"),
    ("purple", "square"),
})
TRAIN_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS)
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)

# Splits and the seeds that keep their random streams apart.
SPLIT_IDS = {"train": 0, "validation": 1, "compositional": 2}

_RADIUS = {"small": (0.085, 0.11), "large": (0.16, 0.2)}  # fraction of the image side
_MARGIN = 0.03


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  colour: str
  shape: str
  size: str
  x: float  # centre, in [0, 1], left to right
  y: float  # centre, in [0, 1], top to bottom
  radius: float  # fraction of the image side
  angle: float  # small rotation, radians
  tint: tuple[float, float, float]  # per-object colour jitter, added to the base colour


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[ShapeObject, ...]
  background: str
  palette: tuple[tuple[float, float, float], ...]  # muted background colours
  texture: tuple[float, ...]  # background parameters (angle, frequency, phase, ...)


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The random stream of one example, independent of every other example."""
  return np.random.default_rng([seed, SPLIT_IDS[split], index])


# ----------------------------------------------------------------------------------------------
# Scenes.


def sample_scene(rng: np.random.Generator, held_out: bool = False) -> Scene:
  """Samples a scene. held_out=False: only training pairs; True: the first object is held out."""
  num_objects = int(rng.integers(1, 4))
  pool = list(ALL_PAIRS if held_out else TRAIN_PAIRS)
  held = sorted(HELD_OUT_PAIRS)
  pairs = [held[rng.integers(len(held))]] if held_out else []
  while len(pairs) < num_objects:  # distinct colour-shape pairs keep "the red circle" unambiguous
    pair = pool[rng.integers(len(pool))]
    if pair not in pairs:
      pairs.append(pair)

  objects = []
  for colour, shape in pairs:
    size = SIZES[rng.integers(2)]
    radius = float(rng.uniform(*_RADIUS[size]))
    for _ in range(100):  # rejection sampling for a free spot
      lo, hi = radius + _MARGIN, 1 - radius - _MARGIN
      x, y = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
      if all(math.hypot(x - o.x, y - o.y) > radius + o.radius + _MARGIN for o in objects):
        break
    else:
      continue  # no room left: the scene keeps fewer objects
    angle = float(rng.uniform(-0.25, 0.25))
    tint = tuple(float(t) for t in rng.uniform(-18, 18, size=3))
    objects.append(ShapeObject(colour, shape, size, x, y, radius, angle, tint))

  background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
  grey = rng.uniform(70, 190, size=(4, 1))
  palette = tuple(tuple(float(v) for v in row) for row in grey + rng.uniform(-22, 22, size=(4, 3)))
  texture = tuple(float(v) for v in rng.uniform(0, 1, size=4))
  return Scene(tuple(objects), background, palette, texture)


# ----------------------------------------------------------------------------------------------
# Rendering.


def _polygon(shape: str, radius: float, angle: float) -> list[tuple[float, float]]:
  """Vertices around the origin (y down) of a shape whose extent is about `radius`."""
  if shape == "square":
    points = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    scale = radius * 0.82
  elif shape == "triangle":
    points = [(math.cos(a), math.sin(a)) for a in np.radians([-90, 30, 150])]
    scale, points = radius * 1.1, [(px, py + 0.2) for px, py in points]
  elif shape == "star":
    radii = [1.0 if k % 2 == 0 else 0.45 for k in range(10)]
    points = [(r * math.cos(a), r * math.sin(a))
              for r, a in zip(radii, np.radians(np.arange(-90, 270, 36)))]
    scale = radius * 1.05
  elif shape == "diamond":
    points = [(0, -1), (0.68, 0), (0, 1), (-0.68, 0)]
    scale = radius
  elif shape == "cross":
    w = 0.34
    points = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
              (-1, w), (-1, -w), (-w, -w)]
    scale = radius * 0.95
  else:
    raise ValueError(f"Unknown shape {shape!r}.")
  cos, sin = math.cos(angle), math.sin(angle)
  return [(scale * (px * cos - py * sin), scale * (px * sin + py * cos)) for px, py in points]


def _background(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
  """float32 [size, size, 3]: a muted texture for the conv stage to work through."""
  palette = np.asarray(scene.palette, np.float32)
  t = scene.texture
  coords = (np.arange(size, dtype=np.float32) + 0.5) / size
  yy, xx = coords[:, None], coords[None, :]
  theta = 2 * math.pi * t[0]
  along = (xx * math.cos(theta) + yy * math.sin(theta))[..., None]
  if scene.background == "gradient":
    lo, hi = float(along.min()), float(along.max())
    w = (along - lo) / (hi - lo)
    image = palette[0] * (1 - w) + palette[1] * w
  elif scene.background == "striped":
    wave = np.sin(2 * math.pi * (3 + 6 * t[1]) * along + 2 * math.pi * t[2])
    image = palette[0] + (12 + 14 * t[3]) * wave * np.array([1.0, 1.0, 1.0], np.float32)
  else:  # noisy: smooth value noise from a coarse grid of palette mixes
    cells = 3 + int(5 * t[1])
    weights = rng.uniform(0, 1, size=(cells, cells, 1)).astype(np.float32)
    coarse = palette[2] * (1 - weights) + palette[3] * weights
    image = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BICUBIC),
                       np.float32)
  return np.broadcast_to(image, (size, size, 3)).astype(np.float32)


def render(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 [size, size, 3]: anti-aliased shapes (drawn supersampled, box-downsampled) on texture."""
  supersample = max(2, min(4, 512 // size))
  image = _background(scene, size, rng)
  for obj in scene.objects:
    cx, cy, r = obj.x * size, obj.y * size, obj.radius * size
    x0, y0 = max(0, int(cx - r) - 2), max(0, int(cy - r) - 2)
    x1, y1 = min(size, int(math.ceil(cx + r)) + 2), min(size, int(math.ceil(cy + r)) + 2)
    mask = Image.new("L", ((x1 - x0) * supersample, (y1 - y0) * supersample), 0)
    draw = ImageDraw.Draw(mask)
    ox, oy = (cx - x0) * supersample, (cy - y0) * supersample
    if obj.shape == "circle":
      rr = r * supersample
      draw.ellipse([ox - rr, oy - rr, ox + rr, oy + rr], fill=255)
    else:
      draw.polygon([(ox + px * supersample, oy + py * supersample)
                    for px, py in _polygon(obj.shape, r, obj.angle)], fill=255)
    alpha = np.asarray(mask.reduce(supersample), np.float32)[..., None] / 255.0
    # A soft light-to-dark shading across the object gives it texture of its own.
    ramp = np.linspace(1.08, 0.88, y1 - y0, dtype=np.float32)[:, None, None]
    colour = (np.asarray(COLOURS[obj.colour], np.float32) + np.asarray(obj.tint, np.float32)) * ramp
    patch = image[y0:y1, x0:x1]
    image[y0:y1, x0:x1] = patch * (1 - alpha) + np.clip(colour, 0, 255) * alpha
  image += rng.normal(0, 3, size=image.shape).astype(np.float32)  # sensor-like grain
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def encode(image: np.ndarray, encoding: str) -> bytes:
  """JPEG (quality 90) or PNG bytes of a uint8 [H, W, 3] image."""
  buffer = io.BytesIO()
  if encoding == "jpeg":
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
  elif encoding == "png":
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
  else:
    raise ValueError(f"encoding must be 'jpeg' or 'png', got {encoding!r}.")
  return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Language.

_SIZE_WORDS = {"small": ("small", "small", "little", "tiny"), "large": ("large", "large", "big")}
_LEFT = ("to the left of", "left of", "on the left of")
_RIGHT = ("to the right of", "right of", "on the right of")
_ABOVE = ("above", "over", "higher than")
_BELOW = ("below", "under", "lower than")
_COUNT_WORDS = ("zero", "one", "two", "three")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[rng.integers(len(options))]


def _with_article(phrase: str, definite: bool) -> str:
  if definite:
    return "the " + phrase
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(obj: ShapeObject, rng: np.random.Generator, definite: bool = False) -> str:
  """E.g. "a small red circle", "the blue square", "a big triangle that is green"."""
  size = _pick(rng, _SIZE_WORDS[obj.size])
  form = rng.integers(5)
  if form < 2:
    phrase = f"{size} {obj.colour} {obj.shape}"
  elif form == 2:
    phrase = f"{obj.colour} {obj.shape}"
  elif form == 3:
    phrase = f"{size} {obj.shape} that is {obj.colour}"
  else:
    phrase = f"{size} {obj.shape} in {obj.colour}"
  return _with_article(phrase, definite)


def _join(phrases: Sequence[str]) -> str:
  if len(phrases) == 1:
    return phrases[0]
  return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _where(obj: ShapeObject) -> str:
  """Where `obj` sits, e.g. "in the top left", "on the right", "at the bottom", "in the centre"."""
  col = ("left", "", "right")[min(2, int(obj.x * 3))]
  row = ("top", "", "bottom")[min(2, int(obj.y * 3))]
  if row and col:
    return f"in the {row} {col}"
  if row:
    return f"at the {row}"
  return f"on the {col}" if col else "in the centre"


def _relations(a: ShapeObject, b: ShapeObject) -> list[tuple[str, tuple[str, ...]]]:
  """Clear spatial and size relations of `a` to `b`, as (kind, phrasings)."""
  out = []
  if a.x < b.x - 0.12:
    out.append(("h", _LEFT))
  elif a.x > b.x + 0.12:
    out.append(("h", _RIGHT))
  if a.y < b.y - 0.12:
    out.append(("v", _ABOVE))
  elif a.y > b.y + 0.12:
    out.append(("v", _BELOW))
  if a.size != b.size:
    out.append(("s", ("bigger than", "larger than") if a.size == "large" else ("smaller than",)))
  return out


def _caption_list(scene, rng):
  nps = _join([noun_phrase(o, rng) for o in rng.permutation(scene.objects)])
  return _pick(rng, (
      "{l}", "there is {l}", "an image of {l}", "a picture of {l}", "a picture showing {l}",
      "{l} on a {bg} background", "on a {bg} background there is {l}",
  )).format(l=nps, bg=scene.background)


def _caption_count(scene, rng):
  n = len(scene.objects)
  noun = "shape" if n == 1 else _pick(rng, ("shapes", "objects"))
  nps = _join([noun_phrase(o, rng) for o in rng.permutation(scene.objects)])
  return _pick(rng, (
      "{n} {noun}: {l}", "{n} {noun} on a {bg} background", "{l}, {n} {noun} in total",
      "a {bg} background with {n} {noun}",
  )).format(n=_COUNT_WORDS[n], noun=noun, l=nps, bg=scene.background)


def _caption_location(scene, rng):
  obj = scene.objects[rng.integers(len(scene.objects))]
  return _pick(rng, (
      "{a} {at}", "{at} there is {a}", "{a} sits {at} of the image", "{at} of the picture is {a}",
  )).format(a=noun_phrase(obj, rng), at=_where(obj))


def _caption_relation(scene, rng):
  pairs = [(a, b, rel) for a in scene.objects for b in scene.objects if a is not b
           for kind, rel in _relations(a, b) if kind in "hv"]
  a, b, rel = pairs[rng.integers(len(pairs))]
  words = _pick(rng, rel)
  return _pick(rng, (
      "{a} {r} {b}", "{A} is {r} {b}", "{r} {b} there is {a}", "{b} with {a} {r} it",
  )).format(a=noun_phrase(a, rng), A=noun_phrase(a, rng, True), b=noun_phrase(b, rng), r=words)


def _caption_compare(scene, rng):
  pairs = [(a, b) for a in scene.objects for b in scene.objects if a.size == "large" != b.size]
  big, small = pairs[rng.integers(len(pairs))]
  return _pick(rng, (
      "{B} is bigger than {s}", "{B} is larger than {s}", "{S} is smaller than {b}",
      "{s} next to a bigger {bs}",
  )).format(B=noun_phrase(big, rng, True), b=noun_phrase(big, rng), S=noun_phrase(small, rng, True),
            s=noun_phrase(small, rng), bs=f"{big.colour} {big.shape}")


def _caption_single(scene, rng):
  obj = scene.objects[0]
  return _pick(rng, (
      "a single {p}", "just one shape: {a}", "only {a} on a {bg} background",
  )).format(p=f"{obj.colour} {obj.shape}", a=noun_phrase(obj, rng), bg=scene.background)


def caption_templates(scene: Scene) -> list:
  """The caption templates that apply to `scene` (always at least three)."""
  templates = [_caption_list, _caption_count, _caption_location]
  if len(scene.objects) == 1:
    templates.append(_caption_single)
  if any(k in "hv" for a in scene.objects for b in scene.objects if a is not b
         for k, _ in _relations(a, b)):
    templates.append(_caption_relation)
  if len({o.size for o in scene.objects}) == 2:
    templates.append(_caption_compare)
  return templates


def captions(scene: Scene, rng: np.random.Generator, count: int = 5) -> list[str]:
  """`count` distinct captions, cycling through the applicable templates in random order."""
  templates = [caption_templates(scene)[i] for i in rng.permutation(len(caption_templates(scene)))]
  out: list[str] = []
  for k in range(count):
    for _ in range(20):  # a repeat is possible for tiny scenes; try other phrasings first
      text = templates[k % len(templates)](scene, rng)
      if text not in out:
        break
    out.append(text)
  return out


_FACTS = (
    "a triangle has three corners", "triangles have three sides", "a square has four equal sides",
    "a square has four corners", "a circle has no corners", "circles are round",
    "a star has five points", "stars have five points and five inner corners",
    "a diamond has four corners", "a diamond is a square standing on one corner",
    "a cross has four arms", "a cross is made of two crossing bars",
    "orange is between red and yellow", "purple is a mix of red and blue",
    "green is a mix of blue and yellow", "pink is a light red", "cyan is a light blue",
    "large shapes are bigger than small shapes", "a big shape covers more of the image",
    "a striped background has lines", "a gradient background goes from one shade to another",
    "a noisy background has soft blotches",
)


def statement(rng: np.random.Generator) -> str:
  """A text-only sentence from the (training) world: a scene description, a fact or a rule."""
  kind = rng.uniform()
  if kind < 0.55:
    scene = sample_scene(rng)
    return ". ".join(captions(scene, rng, count=int(rng.integers(1, 3))))
  if kind < 0.8:
    return _pick(rng, _FACTS)
  a = ShapeObject(*TRAIN_PAIRS[rng.integers(len(TRAIN_PAIRS))], "large", 0, 0, 0, 0, (0, 0, 0))
  b = ShapeObject(*TRAIN_PAIRS[rng.integers(len(TRAIN_PAIRS))], "small", 0, 0, 0, 0, (0, 0, 0))
  left, right = _pick(rng, _LEFT), _pick(rng, _RIGHT)
  return _pick(rng, (
      "if {a} is {l} {b}, then {B} is {r} {A}",
      "{a} is always bigger than {b}",
      "when {a} is above {b}, {B} is below {A}",
  )).format(a=noun_phrase(a, rng), b=noun_phrase(b, rng), A=noun_phrase(a, rng, True),
            B=noun_phrase(b, rng, True), l=left, r=right)


def corpus(num_scenes: int = 4000, num_statements: int = 4000, seed: int = 0) -> Iterator[str]:
  """The deterministic text the embedded SentencePiece model is trained on (training world only)."""
  for i in range(num_scenes):
    rng = example_rng(seed, "train", i)
    yield from captions(sample_scene(rng), rng)
  for i in range(num_statements):
    yield statement(np.random.default_rng([seed, 99, i]))


# ----------------------------------------------------------------------------------------------
# Examples, as the dataset builders store them.


def image_text_example(seed: int, split: str, index: int, image_size: int,
                       encoding: str) -> dict:
  """One stored example: encoded image, five captions and the scene's ground truth."""
  rng = example_rng(seed, split, index)
  scene = sample_scene(rng, held_out=split == "compositional")
  return {
      "image": encode(render(scene, image_size, rng), encoding),
      "captions": captions(scene, rng),
      "objects": {
          "colour": [o.colour for o in scene.objects],
          "shape": [o.shape for o in scene.objects],
          "size": [o.size for o in scene.objects],
          "x": np.asarray([o.x for o in scene.objects], np.float32),
          "y": np.asarray([o.y for o in scene.objects], np.float32),
      },
      "background": scene.background,
  }


def text_example(seed: int, split: str, index: int) -> dict:
  """One stored text-only example (training-world statements in every split)."""
  return {"text": statement(np.random.default_rng([seed, 100 + SPLIT_IDS[split], index]))}
