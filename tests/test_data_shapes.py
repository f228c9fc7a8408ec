"""The shapes world: scenes, rendering, captions, the held-out split, and its TFDS builders."""
import functools
import io
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import tasks
from tasks import build, shapes_builders, shapes_world

COLOUR_WORDS = set(shapes_world.COLOURS)
SHAPE_WORDS = set(shapes_world.SHAPES)


def _scenes(count, held_out=False, split="train"):
  for i in range(count):
    rng = shapes_world.example_rng(0, split, i)
    yield shapes_world.sample_scene(rng, held_out=held_out), rng


def _mentions(text: str, colour: str, shape: str) -> bool:
  """Whether `text` names a `colour` `shape` in any of the grammar's phrasings."""
  return bool(re.search(rf"\b{colour} {shape}\b|\b{shape} (that is|in) {colour}\b", text))


def test_scenes_have_one_to_three_distinct_well_placed_objects():
  counts = set()
  for scene, _ in _scenes(300):
    counts.add(len(scene.objects))
    pairs = [(o.colour, o.shape) for o in scene.objects]
    assert len(set(pairs)) == len(pairs)
    for o in scene.objects:
      assert o.radius <= o.x <= 1 - o.radius and o.radius <= o.y <= 1 - o.radius
    for a in scene.objects:
      for b in scene.objects:
        if a is not b:
          assert np.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius  # no overlap
  assert counts == {1, 2, 3}


def test_world_size():
  assert len(shapes_world.COLOURS) >= 6 and len(shapes_world.SHAPES) >= 4
  assert set(shapes_world.SIZES) == {"small", "large"}


def test_five_distinct_captions_from_at_least_three_templates():
  first_words = set()
  for scene, rng in _scenes(200):
    assert len(shapes_world.caption_templates(scene)) >= 3
    captions = shapes_world.captions(scene, rng)
    assert len(captions) == 5 and len(set(captions)) == 5
    for caption in captions:
      first_words.add(caption.split()[0])
      words = set(re.findall(r"[a-z]+", caption))
      # Captions only name colours and shapes that are in the scene.
      assert words & COLOUR_WORDS <= {o.colour for o in scene.objects}, caption
      assert words & SHAPE_WORDS <= {o.shape for o in scene.objects}, caption
  # Word order varies: captions start with the subject, a relation, a place, a count, ...
  assert {"a", "the", "there", "on", "in", "below", "three"} <= first_words


def test_relations_in_captions_are_true():
  """Every "the <colour> <shape> is <relation> a <colour> <shape>" claim matches the geometry."""
  relation = r"to the left of|left of|on the left of|to the right of|right of|on the right of|" \
             r"above|over|higher than|below|under|lower than"
  pattern = re.compile(rf"the (?:\w+ )?(\w+) (\w+) is ({relation}) an? (?:\w+ )?(\w+) (\w+)$")
  truth = {"left": lambda a, b: a.x < b.x, "right": lambda a, b: a.x > b.x,
           "above": lambda a, b: a.y < b.y, "over": lambda a, b: a.y < b.y,
           "higher": lambda a, b: a.y < b.y, "below": lambda a, b: a.y > b.y,
           "under": lambda a, b: a.y > b.y, "lower": lambda a, b: a.y > b.y}
  checked = set()
  for scene, rng in _scenes(1500):
    where = {(o.colour, o.shape): o for o in scene.objects}
    for caption in shapes_world.captions(scene, rng):
      match = pattern.match(caption)
      if not match or (match[1], match[2]) not in where or (match[4], match[5]) not in where:
        continue  # another template, or "a small square in red" parsed differently
      word = next(w for w in truth if w in match[3])
      assert truth[word](where[match[1], match[2]], where[match[4], match[5]]), caption
      checked.add(word)
  assert checked == set(truth)


def test_held_out_pairs_never_in_training_and_always_in_compositional():
  assert len(shapes_world.HELD_OUT_PAIRS) == 6
  assert {c for c, _ in shapes_world.HELD_OUT_PAIRS} < COLOUR_WORDS  # colours still trained
  assert {s for _, s in shapes_world.HELD_OUT_PAIRS} == SHAPE_WORDS  # every shape still trained
  for scene, rng in _scenes(500):
    assert not {(o.colour, o.shape) for o in scene.objects} & shapes_world.HELD_OUT_PAIRS
    for caption in shapes_world.captions(scene, rng):
      assert not any(_mentions(caption, c, s) for c, s in shapes_world.HELD_OUT_PAIRS)
  for scene, _ in _scenes(200, held_out=True, split="compositional"):
    assert {(o.colour, o.shape) for o in scene.objects} & shapes_world.HELD_OUT_PAIRS


def test_text_stream_leaks_no_held_out_pair():
  texts = [shapes_world.text_example(0, "train", i)["text"] for i in range(1500)]
  assert len(set(texts)) > 1000
  for text in texts:
    assert not any(_mentions(text, c, s) for c, s in shapes_world.HELD_OUT_PAIRS), text


@pytest.mark.parametrize("size", [32, 64, 224])
def test_render_is_deterministic_and_sized(size):
  scene, _ = next(_scenes(1))
  one = shapes_world.render(scene, size, np.random.default_rng(3))
  two = shapes_world.render(scene, size, np.random.default_rng(3))
  assert one.shape == (size, size, 3) and one.dtype == np.uint8
  np.testing.assert_array_equal(one, two)


def test_render_is_anti_aliased_on_a_textured_background():
  obj = shapes_world.ShapeObject("blue", "circle", "large", 0.5, 0.5, 0.3, 0.0, (0, 0, 0))
  scene = shapes_world.Scene((obj,), "striped", ((150, 150, 150),) * 4, (0.1, 0.5, 0.0, 0.5))
  image = shapes_world.render(scene, 64, np.random.default_rng(0)).astype(float)
  centre_row = image[32]
  inside = np.abs(centre_row - np.array(shapes_world.COLOURS["blue"])).sum(-1) < 60
  # Edge pixels mix object and background: neither colour, but in between.
  edge = [x for x in range(1, 63) if inside[x] != inside[x - 1]]
  assert edge
  blue = np.array(shapes_world.COLOURS["blue"], float)
  mixes = [np.abs(image[32, x] - blue).sum() for x in edge]
  assert any(60 <= m <= 300 for m in mixes)
  background = image[:8, :8].reshape(-1, 3)
  assert background.std(0).max() > 3  # texture, not a flat fill


@pytest.mark.parametrize("encoding", ["jpeg", "png"])
def test_examples_are_encoded(encoding):
  example = shapes_world.image_text_example(0, "train", 7, 48, encoding)
  image = Image.open(io.BytesIO(example["image"]))
  assert image.format == encoding.upper() and image.size == (48, 48) and image.mode == "RGB"
  assert len(example["captions"]) == 5
  assert len(example["objects"]["colour"]) == len(example["objects"]["x"])
  again = shapes_world.image_text_example(0, "train", 7, 48, encoding)
  assert again["image"] == example["image"] and again["captions"] == example["captions"]


def test_builders(tmp_path):
  sizes = {"train": 40, "validation": 8, "compositional": 12}
  builder = shapes_builders.ShapesWorld(config="32px_png", data_dir=str(tmp_path),
                                        split_sizes=sizes, seed=1, num_workers=0)
  builder.download_and_prepare()
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == sizes
  assert builder.info.metadata["seed"] == 1
  reader = tfds.builder("shapes_world/32px_png", data_dir=str(tmp_path))
  held_out = shapes_world.HELD_OUT_PAIRS
  colours = reader.info.features["objects"]["colour"].names
  shapes = reader.info.features["objects"]["shape"].names
  for split in sizes:
    for example in tfds.as_numpy(reader.as_dataset(split=split)):
      assert example["image"].shape == (32, 32, 3)
      assert len(example["captions"]) == 5
      pairs = {(colours[c], shapes[s]) for c, s in zip(example["objects"]["colour"],
                                                        example["objects"]["shape"])}
      assert bool(pairs & held_out) == (split == "compositional")

  text = shapes_builders.ShapesWorldText(data_dir=str(tmp_path),
                                         split_sizes={"train": 30, "validation": 5})
  text.download_and_prepare()
  texts = [t["text"].decode() for t in tfds.as_numpy(text.as_dataset(split="train"))]
  assert len(texts) == 30 and all(texts)


def test_parallel_generation_matches_serial():
  make = functools.partial(shapes_world.image_text_example, 0, "train", image_size=32,
                           encoding="png")
  serial = list(shapes_builders._parallel_map(make, 300, 0))
  parallel = list(shapes_builders._parallel_map(make, 300, 2))
  assert [e["image"] for e in serial] == [e["image"] for e in parallel]


def test_unknown_split_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="unknown splits"):
    shapes_builders.ShapesWorld(config="64px", data_dir=str(tmp_path), split_sizes={"test": 3})


def test_build_command(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("SIMVLM_CACHE_DIR", str(tmp_path / "cache"))
  args = ["--data_dir", str(tmp_path / "tfds"), "shapes", "--configs", "32px", "--train", "20",
          "--validation", "4", "--compositional", "4", "--text_train", "30",
          "--text_validation", "5", "--workers", "0"]
  build.main(args)
  out = capsys.readouterr().out
  assert "shapes_world/32px/1.0.0: built in" in out
  assert "'train': 20" in out and "'compositional': 4" in out
  assert "shapes_world_text/1.0.0: built in" in out and "'train': 30" in out
  assert f"({tasks.SHAPES_VOCAB_SIZE} pieces" in out
  build.main(args)
  assert capsys.readouterr().out.count("already built") == 2

  folder = tmp_path / "pairs"
  folder.mkdir()
  (folder / "a.png").write_bytes(shapes_world.encode(np.zeros((8, 8, 3), np.uint8), "png"))
  (folder / "validation.tsv").write_text("a black square\ta.png\n")
  build.main(["--data_dir", str(tmp_path / "own"), "folder", "--source_dir", str(folder)])
  assert "image_text_folder/1.0.0: built in" in capsys.readouterr().out
