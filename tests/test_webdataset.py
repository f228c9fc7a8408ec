"""img2dataset shards read in place: WebDataset tars and parquet files as SeqIO tasks.

The shards are written here in img2dataset's layout (keys 000000000..., `<shard>.tar` beside
`<shard>.parquet` and `<shard>_stats.json`, or image bytes in a parquet `jpg` column), with a
corrupt image, an empty caption, a failed download and samples missing a member.
"""
import collections
import io
import json
import os
import subprocess
import sys
import tarfile

import gin
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio
import tensorflow as tf
from PIL import Image

import tasks
from simvlm_jax.data import pipeline
from simvlm_jax.errors import DataError
from tasks import webdataset

MISSING = object()  # a tar member that is not there (parquet: a null caption / an empty image)
KW = dict(image_text_length=48, text_length=16, image_size=32)


def _image(fmt: str, seed: int) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 255, (24, 40, 3), np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format=fmt)
  return out.getvalue()


# Per shard: (image bytes | MISSING | None (a failed download), caption | MISSING).
SHARDS = [
    [(_image("JPEG", 0), "a red square"), (_image("PNG", 1), "a blue circle"),
     (_image("JPEG", 2)[:200], "a picture cut short"), (_image("JPEG", 3), "")],
    [(_image("JPEG", 4), "a green triangle"), (None, "a picture that never arrived"),
     (_image("WEBP", 5), "a webp image"), (_image("JPEG", 6), "ünïcödé ✓ caption")],
    [(_image("JPEG", 7), MISSING), (MISSING, "a caption without its image"),
     (_image("PNG", 8), "the last image")],
]
GOOD_CAPTIONS = {"a red square", "a blue circle", "a green triangle", "a webp image",
                 "ünïcödé ✓ caption", "the last image"}
COUNTS = {"dropped/bad_image": 2, "dropped/empty_caption": 2, "dropped/empty_text": 0}


def _key(shard: int, index: int) -> str:
  # img2dataset: shard * 10**oom_sample_per_shard + index, oom_shard_count=5, 10,000 per shard.
  return f"{shard * 10**4 + index:09d}"


def _metadata(shard: int, samples: list) -> dict:
  """img2dataset's per-sample metadata columns (url, caption, key, status, sizes, ...)."""
  failed = [image is None for image, _ in samples]
  return {
      "url": [f"https://example.com/{_key(shard, i)}.jpg" for i in range(len(samples))],
      "caption": [None if c is MISSING else c for _, c in samples],
      "key": [_key(shard, i) for i in range(len(samples))],
      "status": ["failed_to_download" if f else "success" for f in failed],
      "error_message": ["404 Client Error" if f else None for f in failed],
      "width": [None if f else 40 for f in failed],
      "height": [None if f else 24 for f in failed],
      "exif": [None if f else "{}" for f in failed],
      "sha256": [None if f else "0" * 64 for f in failed],
  }


def _write_stats(folder, shard: int, samples: list) -> None:
  failed = sum(image is None for image, _ in samples)
  stats = {"count": len(samples), "successes": len(samples) - failed,
           "failed_to_download": failed, "failed_to_resize": 0, "duration": 1.0,
           "start_time": 0.0, "end_time": 1.0, "status_dict": {"success": len(samples) - failed}}
  (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))


def write_webdataset(folder, shards=SHARDS) -> list[str]:
  """img2dataset's output_format=webdataset; returns the tar paths."""
  paths = []
  for shard, samples in enumerate(shards):
    path = folder / f"{shard:05d}.tar"
    with tarfile.open(path, "w") as tar:
      for i, (image, caption) in enumerate(samples):
        if image is None:
          continue  # img2dataset writes failed downloads to the side parquet only
        members = {"json": json.dumps({"key": _key(shard, i), "status": "success"}, indent=4)}
        if image is not MISSING:
          members["jpg"] = image
        if caption is not MISSING:
          members["txt"] = caption
        for ext in sorted(members):  # WebDataset's TarWriter: sorted, mode 0o444, user bigdata
          data = members[ext].encode() if isinstance(members[ext], str) else members[ext]
          info = tarfile.TarInfo(f"{_key(shard, i)}.{ext}")
          info.size, info.mode, info.uname, info.gname = len(data), 0o444, "bigdata", "bigdata"
          tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table(_metadata(shard, samples)), folder / f"{shard:05d}.parquet")
    _write_stats(folder, shard, samples)
    paths.append(str(path))
  return paths


def write_parquet(folder, shards=SHARDS) -> list[str]:
  """img2dataset's output_format=parquet (row groups of 2 rows); returns the parquet paths."""
  paths = []
  for shard, samples in enumerate(shards):
    columns = _metadata(shard, samples)
    columns["jpg"] = [b"" if image is MISSING else image for image, _ in samples]
    path = folder / f"{shard:05d}.parquet"
    pq.write_table(pa.table(columns), path, row_group_size=2)
    _write_stats(folder, shard, samples)
    paths.append(str(path))
  return paths


def _expected(shards=SHARDS) -> list[list[tuple[bytes, str]]]:
  """Per shard, the (image, caption) pairs a reader gives: failed downloads left out."""
  return [[(b"" if image is MISSING else image, "" if caption is MISSING else caption)
           for image, caption in samples if image is not None] for samples in shards]


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
  """Keeps the vocabulary cache of these tests out of the home directory."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("SIMVLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "simvlm_cache"))
    yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """{"webdataset": tar paths, "parquet": parquet paths}, three shards each."""
  return {"webdataset": write_webdataset(tmp_path_factory.mktemp("wds")),
          "parquet": write_parquet(tmp_path_factory.mktemp("parquet"))}


@pytest.fixture(scope="module")
def registered(shards, tmp_path_factory):
  """{format: (task, mixture with a text-file task)}, the task reading the shards by glob."""
  corpus = tmp_path_factory.mktemp("text") / "corpus.txt"
  corpus.write_text("\n".join(f"a line of text number {i}" for i in range(20)))
  text = tasks.register_text_file("wdtest_text", str(corpus))
  folders = {f: os.path.dirname(paths[0]) for f, paths in shards.items()}
  out = {"webdataset": tasks.register_webdataset("wdtest_tar", f"{folders['webdataset']}/*.tar"),
         "parquet": tasks.register_image_text_parquet("wdtest_parquet",
                                                      f"{folders['parquet']}/*.parquet")}
  return {f: (task, tasks.register_pretrain_mixture(f"{task}_mix", [task], [text]))
          for f, task in out.items()}


def _read(fmt: str, path: str, **kwargs) -> list[tuple[bytes, str]]:
  reader = webdataset.read_tar if fmt == "webdataset" else webdataset.read_parquet
  return [(ex["image"], ex["text"].decode())
          for ex in reader(tf.constant(path), **kwargs).as_numpy_iterator()]


@pytest.mark.parametrize("chunk_bytes", [1, 3000, webdataset.CHUNK_BYTES])
def test_tar_reader_gives_every_sample_as_stored(shards, chunk_bytes):
  # 1: a read per sample; 3000: chunks of one or two samples; default: one read per shard.
  for path, expected in zip(shards["webdataset"], _expected(), strict=True):
    assert _read("webdataset", path, chunk_bytes=chunk_bytes) == expected


def test_parquet_reader_gives_every_row_with_an_image(shards):
  for path, expected in zip(shards["parquet"], _expected(), strict=True):
    assert _read("parquet", path) == expected


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_task_gives_the_pairs_with_tokenized_captions(registered, fmt):
  task = seqio.get_mixture_or_task(registered[fmt][0])
  examples = list(task.get_dataset({"text": 64}, split="train", shuffle=False).as_numpy_iterator())
  got = collections.Counter((ex["image"], tasks.VOCABULARY.decode(ex["text"].tolist()))
                            for ex in examples)
  assert got == collections.Counter(pair for shard in _expected() for pair in shard)
  assert all(ex["text"].dtype == np.int32 for ex in examples)


def _images(task_name: str, **kwargs) -> list[bytes]:
  ds = seqio.get_mixture_or_task(task_name).get_dataset({"text": 64}, split="train", **kwargs)
  return [ex["image"] for ex in ds.as_numpy_iterator()]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_hosts_read_disjoint_files(registered, fmt):
  task = registered[fmt][0]
  hosts = [_images(task, shuffle=False, shard_info=seqio.ShardInfo(i, 2)) for i in range(2)]
  by_shard = [{image for image, _ in shard} for shard in _expected()]
  assert set(hosts[0]) == by_shard[0] | by_shard[2]  # host i reads files i, i + 2, ...
  assert set(hosts[1]) == by_shard[1]
  assert len(hosts[0]) + len(hosts[1]) == sum(map(len, _expected()))
  with pytest.raises(ValueError, match="3 shard files .* for 4 hosts"):
    _images(task, shuffle=False, shard_info=seqio.ShardInfo(0, 4))


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_training_order_is_shuffled_and_deterministic(registered, fmt):
  task = registered[fmt][0]
  in_order = _images(task, shuffle=False)
  first, again, other = (_images(task, shuffle=True, seed=seed, num_epochs=1)
                         for seed in (3, 3, 4))
  assert first == again
  assert first != in_order and first != other
  assert sorted(first) == sorted(in_order) == sorted(other)


def _rows(batches) -> list[str]:
  """The captions of the non-padding image-text rows."""
  return [tasks.VOCABULARY.decode([t for t in tokens if t > 1])
          for batch in batches for tokens in batch["image_text"]["text_tokens"] if tokens[0]]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_pipeline_counts_bad_samples_and_resumes_an_eval_pass(registered, fmt, tmp_path):
  make = lambda: pipeline.make_eval_iterator(  # noqa: E731
      registered[fmt][0], split="train", image_text_batch_size=2, text_batch_size=0,
      shard_index=0, num_shards=1, **KW)
  whole = make()
  batches = list(whole)
  assert sorted(_rows(batches)) == sorted(GOOD_CAPTIONS)
  assert whole.counters() == COUNTS
  it = make()
  first = next(it)
  it.save(str(tmp_path / "eval"))
  resumed = make()
  resumed.restore(str(tmp_path / "eval"))
  rest = list(resumed)
  assert _rows([first] + rest) == _rows(batches)
  assert resumed.counters() == COUNTS


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_training_resumes_with_exactly_the_next_batches(registered, fmt, tmp_path):
  make = lambda: pipeline.make_pretrain_iterator(  # noqa: E731
      registered[fmt][1], image_text_batch_size=3, text_batch_size=1, seed=5, shard_index=0,
      num_shards=1, crop_min_area=0.5, **KW)
  it = make()
  for _ in range(5):  # 15 rows: into the third epoch of 6 good samples
    next(it)
  counters = it.counters()
  assert counters["dropped/bad_image"] > 0 and counters["dropped/empty_caption"] > 0
  it.save(str(tmp_path / "train"))
  expected = [next(it) for _ in range(4)]
  resumed = make()
  resumed.restore(str(tmp_path / "train"))
  assert resumed.counters() == counters
  for a, b in zip(expected, [next(resumed) for _ in range(4)], strict=True):
    for key in a:
      for feature in a[key]:
        np.testing.assert_array_equal(a[key][feature], b[key][feature])
  assert resumed.counters() == it.counters()


def _member_offsets(path: str) -> list[tarfile.TarInfo]:
  with tarfile.open(path) as tar:
    return tar.getmembers()


def _damage(path: str, out: str, how: str) -> None:
  data = bytearray(open(path, "rb").read())
  members = _member_offsets(path)
  middle = members[len(members) // 2]
  if how == "cut_inside_a_member":
    data = data[:middle.offset_data + middle.size // 2]
  elif how == "cut_at_a_member_boundary":
    data = data[:middle.offset]  # whole members only, no end-of-archive block
  elif how == "corrupt_header":
    data[middle.offset:middle.offset + 100] = b"x" * 100
  else:  # "not_a_tar"
    data = b"this is not a tar file" * 100
  with open(out, "wb") as f:
    f.write(bytes(data))


@pytest.mark.parametrize("how,message", [
    ("cut_inside_a_member", "damaged or not a tar archive"),
    ("cut_at_a_member_boundary", "damaged or truncated: no end-of-archive block"),
    ("corrupt_header", "damaged or truncated: no end-of-archive block"),
    ("not_a_tar", "damaged or not a tar archive"),
])
def test_a_damaged_tar_raises(shards, tmp_path, how, message):
  damaged = str(tmp_path / "00001.tar")
  _damage(shards["webdataset"][0], damaged, how)
  with pytest.raises(webdataset.ShardReadError, match=f"{damaged} is {message}"):
    webdataset._tar_index(damaged, webdataset.IMAGE_EXTENSIONS, "txt", 1 << 20)
  with pytest.raises(webdataset.ShardReadError, match=message):
    list(webdataset.tar_captions(damaged))


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_a_damaged_file_stops_the_pipeline(shards, tmp_path, fmt):
  """Not skipped, not counted as bad images: the run stops, naming the file."""
  good = shards[fmt][0]
  damaged = str(tmp_path / f"00001{os.path.splitext(good)[1]}")
  if fmt == "webdataset":
    _damage(good, damaged, "cut_inside_a_member")
    task = tasks.register_webdataset(f"wdtest_damaged_{fmt}", [good, damaged])
  else:
    with open(good, "rb") as f, open(damaged, "wb") as g:
      g.write(f.read()[:-100])
    task = tasks.register_image_text_parquet(f"wdtest_damaged_{fmt}", [good, damaged])
  it = pipeline.make_eval_iterator(task, split="train", image_text_batch_size=2,
                                   text_batch_size=0, shard_index=0, num_shards=1, **KW)
  with pytest.raises(DataError, match=f"^the input pipeline cannot read its data: "
                     f"InvalidArgumentError: .*{damaged} is (damaged|not a read)"):
    list(it)


def test_a_missing_parquet_column_raises(shards):
  with pytest.raises(webdataset.ShardReadError, match=r"has no column \['image'\]"):
    _read("parquet", shards["parquet"][0], image_column="image")


@pytest.mark.parametrize("name,expected", [
    ("000000001.jpg", ("000000001", "jpg")),
    ("part/000000001.JPG", ("part/000000001", "jpg")),
    ("a.b.txt", ("a", "b.txt")),  # the key ends at the first dot of the file name
    ("dir.v2/sample.txt", ("dir.v2/sample", "txt")),
    ("README", None),
    (".hidden", None),
])
def test_member_names_split_as_webdataset_does(name, expected):
  assert webdataset.split_member_name(name) == expected


def test_image_extension_preference_and_grouping(tmp_path):
  path = str(tmp_path / "mixed.tar")
  with tarfile.open(path, "w") as tar:
    for name, data in [("a.png", b"png-a"), ("a.jpg", b"jpg-a"), ("a.txt", b"cap-a"),
                       ("b.webp", b"webp-b"), ("b.txt", b"cap-b"), ("notes", b"no key"),
                       ("a.txt", b"cap-a2")]:  # a key seen again later is a new sample
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  assert _read("webdataset", path) == [(b"jpg-a", "cap-a"), (b"webp-b", "cap-b"), (b"", "cap-a2")]
  assert _read("webdataset", path, image_ext=("png",)) == [
      (b"png-a", "cap-a"), (b"", "cap-b"), (b"", "cap-a2")]
  assert list(webdataset.tar_captions(path)) == ["cap-a", "cap-b", "cap-a2"]


def test_webdataset_gin_file(shards):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  folder = os.path.dirname(shards["webdataset"][0])
  try:
    gin.parse_config_file(os.path.join(repo, "gin", "data", "webdataset.gin"))
    gin.parse_config([f"WEBDATASET_SHARDS = '{folder}/*.tar'",
                      f"OWN_TEXT_FILES = ['{folder}/none.txt']",
                      "OWN_MIXTURE = 'wdtest_gin_mixture'"])
    name = gin.get_configurable("tasks.register_pretrain_mixture")()
  finally:
    gin.clear_config()
  mixture = seqio.get_mixture_or_task(name)
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {
      "webdataset_image_text": tasks.IMAGE_TEXT_RATE, "webdataset_text": tasks.TEXT_RATE}
  assert _images("webdataset_image_text", shuffle=False) == [
      image for shard in _expected() for image, _ in shard]


_EXIT_SCRIPT = """
import sys
import tasks
from simvlm_jax.data import pipeline
task = tasks.register_webdataset("exit_test", sys.argv[1] + "/*.tar")
iterators = [pipeline.make_pretrain_iterator(
    task, image_text_batch_size=1, text_batch_size=0, image_text_length=48, text_length=16,
    image_size=32, seed=seed, shard_index=0, num_shards=1) for seed in range(4)]
for it in iterators:
  next(it)
print("exiting with open iterators", flush=True)
"""


@pytest.mark.slow
def test_the_process_exits_with_iterators_still_reading(tmp_path):
  """Index reads in flight at exit (tf.numpy_function threads) must not hang the interpreter."""
  write_webdataset(tmp_path, [SHARDS[0][:1]] * 64)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path)], cwd=repo,
                          env={**os.environ, "PYTHONPATH": repo}, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "exiting with open iterators" in result.stdout
