"""The input pipeline end to end: mixture ratio, batch contract, host sharding, exact resume,
bad-input counters, user data (JSONL/TSV folders, text files) and the gin files."""
import collections
import io
import json
import os

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf
from PIL import Image

import tasks
from simvlm_jax.data import feature_converter, pipeline
from simvlm_jax.errors import DataError, UserError
from tasks import shapes_builders

SIZES = {"train": 48, "validation": 16, "compositional": 12}
TEXT_SIZES = {"train": 64, "validation": 10}
KW = dict(image_text_length=16, text_length=24, image_size=32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
  """Keeps the vocabulary cache of these tests out of the home directory."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("SIMVLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "simvlm_cache"))
    yield


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
  """A tiny shapes world (64px images), registered as ptest_{image_text,text,pretrain}."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  shapes_builders.ShapesWorld(config="64px", data_dir=data_dir, split_sizes=SIZES,
                              num_workers=0).download_and_prepare()
  shapes_builders.ShapesWorldText(data_dir=data_dir, split_sizes=TEXT_SIZES,
                                  num_workers=0).download_and_prepare()
  return tasks.register_shapes("64px", data_dir=data_dir, prefix="ptest")


def _png(array, **kwargs) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, format="PNG", **kwargs)
  return out.getvalue()


def _jpeg(array) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, format="JPEG")
  return out.getvalue()


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
  """A user folder with good and bad inputs (JSONL + TSV) and a text file, registered."""
  folder = tmp_path_factory.mktemp("pairs")
  rng = np.random.default_rng(0)
  files = {
      "good.jpg": _jpeg(rng.integers(0, 255, (48, 64, 3), np.uint8)),
      "rgba.png": _png(rng.integers(0, 255, (40, 40, 4), np.uint8)),
      "grey16.png": _png((rng.integers(0, 65535, (30, 50))).astype(np.uint16)),
      "palette.png": _png(rng.integers(0, 255, (20, 20, 3), np.uint8), bits=4),
      "truncated.jpg": _jpeg(rng.integers(0, 255, (64, 64, 3), np.uint8))[:300],
      "garbage.jpg": b"this is not an image",
      "valid_for_empty.png": _png(rng.integers(0, 255, (8, 8, 3), np.uint8)),
  }
  for name, data in files.items():
    (folder / name).write_bytes(data)
  records = [("good.jpg", "a photo of noise"), ("rgba.png", "a transparent square"),
             ("grey16.png", "a sixteen bit grey image"), ("truncated.jpg", "a cut off file"),
             ("garbage.jpg", "text pretending to be an image"), ("valid_for_empty.png", ""),
             ("valid_for_empty.png", "   "), ("missing.jpg", "a file that does not exist")]
  (folder / "train.jsonl").write_text(
      "\n".join(json.dumps({"image": image, "caption": caption}) for image, caption in records))
  (folder / "train.tsv").write_text("a palette image from the tsv\tpalette.png\n"
                                    "\tgood.jpg\n")
  out = str(tmp_path_factory.mktemp("own_tfds"))
  tasks.ImageTextFolder(data_dir=out, source_dir=str(folder)).download_and_prepare()
  corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  corpus.write_text("the first line of text\n\nanother line\n   \nthe last line\n")
  image_text = tasks.register_image_text_folder("ptest_folder", out)
  text = tasks.register_text_file("ptest_corpus", str(corpus), validation_files=str(corpus))
  return tasks.register_pretrain_mixture("ptest_own", [image_text], [text])


def _rows(batches, key):
  """Non-padding rows of one sub-batch over a list of batches."""
  out = []
  for batch in batches:
    for i, tokens in enumerate(batch[key]["text_tokens"]):
      if tokens[0]:
        out.append({k: v[i] for k, v in batch[key].items()})
  return out


def _assert_eos_terminated(tokens):
  for row in tokens:
    length = np.count_nonzero(row)
    assert length >= 2 and row[length - 1] == 1 and np.all(row[length:] == 0)
    assert np.all(row[:length - 1] > 2)  # real pieces, no pad/eos/unk inside


def test_every_batch_holds_the_configured_rows(shapes):
  it = pipeline.make_pretrain_iterator(shapes, image_text_batch_size=6, text_batch_size=2,
                                       shard_index=0, num_shards=1, **KW)
  assert iter(it) is it
  for _ in range(12):  # more than an epoch of both streams
    batch = next(it)
    assert set(batch) == {"image_text", "text"}
    assert set(batch["image_text"]) == {"images", "text_tokens"} and set(batch["text"]) == {
        "text_tokens"}
    images, tokens = batch["image_text"]["images"], batch["image_text"]["text_tokens"]
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert tokens.shape == (6, 16) and tokens.dtype == np.int32
    assert batch["text"]["text_tokens"].shape == (2, 24)
    assert batch["text"]["text_tokens"].dtype == np.int32
    assert images.std() > 10
    _assert_eos_terminated(tokens)
    _assert_eos_terminated(batch["text"]["text_tokens"])
  assert it.element_spec["image_text"]["images"].shape == (6, 32, 32, 3)
  assert it.counters() == {"dropped/bad_image": 0, "dropped/empty_caption": 0,
                           "dropped/empty_text": 0}


def test_non_square_images_and_a_text_free_mixture(shapes):
  it = pipeline.make_pretrain_iterator(shapes, image_text_batch_size=3, text_batch_size=0,
                                       shard_index=0, num_shards=1, image_text_length=16,
                                       text_length=8, image_size=(24, 40))
  batch = next(it)
  assert batch["image_text"]["images"].shape == (3, 24, 40, 3)
  assert batch["text"]["text_tokens"].shape == (0, 8)


def test_rates_weigh_tasks_of_the_same_kind(shapes, tmp_path):
  other_dir = str(tmp_path / "tfds")
  shapes_builders.ShapesWorld(config="64px", data_dir=other_dir, seed=5, num_workers=0,
                              split_sizes={"train": 48, "validation": 0,
                                           "compositional": 0}).download_and_prepare()
  tasks.register_shapes("64px", data_dir=other_dir, prefix="ptest_other")
  mixture = tasks.register_pretrain_mixture(
      "ptest_rates", {"ptest_image_text": 3, "ptest_other_image_text": 1}, ["ptest_text"])
  other_images = {r["images"].tobytes() for r in _rows(
      _eval_pass("ptest_other_image_text", split="train", image_text_batch_size=8,
                 text_batch_size=0), "image_text")}
  assert len(other_images) == 48
  it = pipeline.make_pretrain_iterator(mixture, image_text_batch_size=8, text_batch_size=1,
                                       shard_index=0, num_shards=1, **KW)
  rows = _rows(_take(it, 40), "image_text")
  share = sum(r["images"].tobytes() in other_images for r in rows) / len(rows)
  assert 0.15 < share < 0.35  # 1 / (3 + 1) of the image-text rows; text rows are fixed apart


def test_hosts_get_their_share_of_the_global_batch(shapes):
  it = pipeline.make_pretrain_iterator(shapes, image_text_batch_size=8, text_batch_size=2,
                                       shard_index=1, num_shards=2, **KW)
  batch = next(it)
  assert batch["image_text"]["images"].shape[0] == 4 and batch["text"]["text_tokens"].shape[0] == 1
  with pytest.raises(ValueError, match="not divisible by 3 hosts"):
    pipeline.make_pretrain_iterator(shapes, image_text_batch_size=8, text_batch_size=3,
                                    shard_index=0, num_shards=3, **KW)
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.make_pretrain_iterator(shapes, image_text_batch_size=8, text_batch_size=2,
                                    shard_index=2, num_shards=2, **KW)


def _eval_pass(name, shard_index=0, num_shards=1, split="validation", **sizes):
  sizes = sizes or dict(image_text_batch_size=4, text_batch_size=4)
  return list(pipeline.make_eval_iterator(name, split=split, shard_index=shard_index,
                                          num_shards=num_shards, **sizes, **KW))


def test_host_shards_are_disjoint_and_cover_the_data(shapes):
  whole = _eval_pass(shapes)
  parts = [_eval_pass(shapes, i, 2) for i in range(2)]
  images = [{r["images"].tobytes() for r in _rows(p, "image_text")} for p in parts]
  assert not images[0] & images[1]
  assert images[0] | images[1] == {r["images"].tobytes() for r in _rows(whole, "image_text")}
  assert len(images[0] | images[1]) == SIZES["validation"]
  texts = [collections.Counter(r["text_tokens"].tobytes() for r in _rows(p, "text"))
           for p in parts]
  assert texts[0] + texts[1] == collections.Counter(
      r["text_tokens"].tobytes() for r in _rows(whole, "text"))
  assert min(sum(t.values()) for t in texts) > 0
  assert sum(sum(t.values()) for t in texts) == TEXT_SIZES["validation"]


def test_eval_is_one_padded_deterministic_pass(shapes):
  first, second = _eval_pass(shapes), _eval_pass(shapes)
  # 16 image-text and 10 text rows in batches of 4: 4 batches, the text stream padded.
  assert len(first) == 4
  assert [len(_rows([b], "text")) for b in first] == [4, 4, 2, 0]
  last = first[-1]["text"]["text_tokens"]
  assert np.all(last[2:] == 0)
  for a, b in zip(first, second):
    for key in a:
      for feature in a[key]:
        np.testing.assert_array_equal(a[key][feature], b[key][feature])


def test_compositional_split_evaluates_images_only(shapes):
  batches = _eval_pass(shapes, split="compositional")
  assert len(_rows(batches, "image_text")) == SIZES["compositional"]
  assert not _rows(batches, "text")  # text tasks have no such split: padding only
  assert batches[0]["text"]["text_tokens"].shape == (4, 24)


def _take(it, count):
  return [next(it) for _ in range(count)]


def _assert_same(batches_a, batches_b):
  for a, b in zip(batches_a, batches_b, strict=True):
    for key in a:
      for feature in a[key]:
        np.testing.assert_array_equal(a[key][feature], b[key][feature])


def test_resume_replays_nothing_and_skips_nothing(shapes, tmp_path):
  make = lambda: pipeline.make_pretrain_iterator(  # noqa: E731
      shapes, image_text_batch_size=5, text_batch_size=3, seed=7, shard_index=0, num_shards=1,
      crop_min_area=0.5, **KW)
  it = make()
  _take(it, 11)  # into the second epoch (48 images / 5), with random crops in play
  it.save(str(tmp_path / "data" / "process_0"))
  expected = _take(it, 6)
  resumed = make()
  resumed.restore(str(tmp_path / "data" / "process_0"))
  _assert_same(_take(resumed, 6), expected)
  # And a fresh run with the same seed is the same stream from the start.
  _assert_same(_take(make(), 3), _take(make(), 3))


def test_the_seed_changes_the_stream(shapes):
  streams = [pipeline.make_pretrain_iterator(shapes, image_text_batch_size=4, text_batch_size=2,
                                             seed=seed, shard_index=0, num_shards=1, **KW)
             for seed in (0, 1)]
  a, b = (next(s) for s in streams)
  assert not np.array_equal(a["image_text"]["images"], b["image_text"]["images"])


def test_bad_inputs_are_dropped_and_counted(own_data):
  it = pipeline.make_eval_iterator("ptest_folder", split="train", image_text_batch_size=2,
                                   text_batch_size=0, shard_index=0, num_shards=1, **KW)
  batches = list(it)
  rows = _rows(batches, "image_text")
  # good.jpg, rgba.png, grey16.png from the JSONL and palette.png from the TSV survive.
  assert len(rows) == 4
  assert it.counters() == {"dropped/bad_image": 2, "dropped/empty_caption": 3,
                           "dropped/empty_text": 0}
  captions = {tasks.VOCABULARY.decode([t for t in r["text_tokens"] if t > 1]) for r in rows}
  assert captions == {"a photo of noise", "a transparent square", "a sixteen bit grey image",
                      "a palette image from the tsv"}
  text = pipeline.make_eval_iterator("ptest_corpus", split="train", image_text_batch_size=0,
                                     text_batch_size=2, shard_index=0, num_shards=1, **KW)
  assert len(_rows(list(text), "text")) == 3
  assert text.counters()["dropped/empty_text"] == 2


def test_training_on_bad_inputs_never_stops_and_counters_resume(own_data, tmp_path):
  make = lambda: pipeline.make_pretrain_iterator(  # noqa: E731
      own_data, image_text_batch_size=3, text_batch_size=2, shard_index=0, num_shards=1, **KW)
  it = make()
  _take(it, 10)
  counters = it.counters()
  assert counters["dropped/bad_image"] >= 4 and counters["dropped/empty_caption"] >= 6
  assert counters["dropped/empty_text"] >= 4
  it.save(str(tmp_path / "it"))
  expected = _take(it, 4)
  resumed = make()
  resumed.restore(str(tmp_path / "it"))
  assert resumed.counters() == counters
  _assert_same(_take(resumed, 4), expected)
  assert resumed.counters() == it.counters()


def test_configuration_errors(shapes, own_data):
  with pytest.raises(ValueError, match="import tasks"):
    pipeline.make_pretrain_iterator("no_such_task", image_text_batch_size=2, text_batch_size=2,
                                    shard_index=0, num_shards=1, **KW)
  with pytest.raises(ValueError, match="no text task"):
    pipeline.make_pretrain_iterator("ptest_image_text", image_text_batch_size=2,
                                    text_batch_size=2, shard_index=0, num_shards=1, **KW)
  with pytest.raises(ValueError, match="no split 'compositional'"):
    pipeline.make_pretrain_iterator(shapes, split="compositional", image_text_batch_size=2,
                                    text_batch_size=2, shard_index=0, num_shards=1, **KW)
  with pytest.raises(ValueError, match="both 0"):
    pipeline.make_pretrain_iterator(shapes, image_text_batch_size=0, text_batch_size=0,
                                    shard_index=0, num_shards=1, **KW)
  unbuilt = tasks.register_shapes("48px", data_dir="/nonexistent/tfds", prefix="ptest_unbuilt")
  with pytest.raises(UserError, match="python -m tasks.build"):
    pipeline.make_pretrain_iterator(unbuilt, image_text_batch_size=2, text_batch_size=2,
                                    shard_index=0, num_shards=1, **KW)


def test_vocabulary_of_a_mixture(shapes):
  assert pipeline.vocabulary(shapes) is tasks.VOCABULARY
  assert pipeline.vocabulary(shapes).vocab_size == tasks.SHAPES_VOCAB_SIZE


@pytest.mark.parametrize("tokens,expected,has_text", [
    ([5, 6, 7], [5, 6, 7, 1, 0, 0], True),
    ([5, 6, 7, 1], [5, 6, 7, 1, 0, 0], True),  # an EOS already there is not doubled
    ([3, 4, 5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 7, 1], True),  # cut, EOS kept last
    ([], [1, 0, 0, 0, 0, 0], False),
    ([1], [1, 0, 0, 0, 0, 0], False),
])
def test_finish_tokens(tokens, expected, has_text):
  out, nonempty = feature_converter.finish_tokens(tf.constant(tokens, tf.int32), 6)
  assert out.numpy().tolist() == expected and bool(nonempty) == has_text


@pytest.mark.parametrize("train", [False, True])
def test_decode_errors_are_dropped_in_order_and_input_errors_stop_the_stream(train):
  """Bad images across several decode groups, at a group's end and in the last partial group."""
  bad = {3, 15, 16, 17, 40, 44}
  images = [b"not an image" if i in bad else _png(np.full((4, 4, 3), i, np.uint8))
            for i in range(45)]
  examples = tf.data.Dataset.from_tensor_slices(
      {"image": images, "text": [[i + 3] for i in range(45)]})
  converter = feature_converter.PretrainFeatureConverter(
      image_text_batch_size=4, text_batch_size=0, image_text_length=4, text_length=4,
      image_size=(4, 4), train=train)
  batches = list(converter(examples.repeat(2) if train else examples, None).take(19))
  rows = [(int(t[0]) - 3, int(image[0, 0, 0])) for b in batches
          for t, image in zip(b["image_text"]["text_tokens"], b["image_text"]["images"]) if t[0]]
  good = [i for i in range(45) if i not in bad]
  assert rows == [(i, i) for i in (good + good)[:len(rows)]]
  assert len(rows) == (76 if train else 39)  # train: 19 full batches; eval: all 39, padded
  if not train:
    assert batches[-1]["image_text"]["drop_counts"].numpy().tolist() == [6, 0]

  def damaged(i):  # an error of the input itself, as a truncated file gives
    tf.debugging.assert_none_equal(i, tf.constant(20, tf.int64), message="damaged input")
    return {"image": tf.constant(images[0]), "text": tf.constant([5])}

  with pytest.raises(tf.errors.InvalidArgumentError, match="damaged input"):
    list(converter(tf.data.Dataset.range(45).map(damaged), None))


def test_a_damaged_tfrecord_stops_the_stream_in_one_line(tmp_path):
  """A cut TFRecord is not a bad image: no row is dropped and counted, the run stops naming it."""
  data_dir = str(tmp_path / "tfds")
  shapes_builders.ShapesWorld(config="64px", data_dir=data_dir,
                              split_sizes={"train": 4, "validation": 16, "compositional": 2},
                              num_workers=0).download_and_prepare()
  shapes_builders.ShapesWorldText(data_dir=data_dir, split_sizes={"train": 4, "validation": 2},
                                  num_workers=0).download_and_prepare()
  mixture = tasks.register_shapes("64px", data_dir=data_dir, prefix="ptest_damaged")
  record, = [os.path.join(root, name) for root, _, names in os.walk(data_dir) for name in names
             if "shapes_world-validation.tfrecord" in name]
  with open(record, "rb") as f:
    data = f.read()
  with open(record, "wb") as f:
    f.write(data[:len(data) // 2])
  it = pipeline.make_eval_iterator(mixture, split="validation", image_text_batch_size=4,
                                   text_batch_size=0, shard_index=0, num_shards=1, **KW)
  with pytest.raises(DataError, match=r"^the input pipeline cannot read its data: "
                     r"DataLossError: .*truncated record") as error:
    list(it)
  assert "\n" not in str(error.value)


def test_converter_rejects_bad_settings():
  base = dict(image_text_batch_size=2, text_batch_size=2, image_text_length=8, text_length=8,
              image_size=(8, 8), train=True)
  for change in ({"text_length": 1}, {"image_text_batch_size": -1}, {"crop_min_area": 0.0},
                 {"image_size": (8,)}):
    with pytest.raises(ValueError):
      feature_converter.PretrainFeatureConverter(**{**base, **change})


@pytest.mark.parametrize("gin_file,mixture", [("shapes64.gin", "shapes64_pretrain"),
                                              ("shapes224.gin", "shapes224_pretrain")])
def test_gin_files(gin_file, mixture):
  try:
    gin.parse_config_file(os.path.join(REPO, "gin", "data", gin_file))
    assert gin.query_parameter("make_pretrain_iterator.mixture_or_task_name") == mixture
    assert gin.query_parameter("%VOCAB_SIZE") == tasks.SHAPES_VOCAB_SIZE
    assert mixture in seqio.MixtureRegistry.names()
  finally:
    gin.clear_config()


def test_own_data_gin_file(tmp_path):
  try:
    gin.parse_config_file(os.path.join(REPO, "gin", "data", "own_data.gin"))
    gin.parse_config([f"OWN_DATA_DIR = '{tmp_path}'", f"OWN_TEXT_FILES = ['{tmp_path}/a.txt']",
                      "OWN_MIXTURE = 'ptest_gin_mixture'"])
    name = gin.get_configurable("tasks.register_pretrain_mixture")()
  finally:
    gin.clear_config()
  mixture = seqio.get_mixture_or_task(name)
  assert name == "ptest_gin_mixture"
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {
      "own_image_text": tasks.IMAGE_TEXT_RATE, "own_text": tasks.TEXT_RATE}
