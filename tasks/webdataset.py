"""img2dataset output, read in place: WebDataset `.tar` shards and parquet shards.

img2dataset (https://github.com/rom1504/img2dataset) writes, per shard `<shard>` (e.g. 00000):
  output_format=webdataset  `<shard>.tar` with `<key>.jpg`, `<key>.txt`, `<key>.json` per
                            sample (successful downloads only), beside `<shard>.parquet`
                            (per-sample metadata) and `<shard>_stats.json`
  output_format=parquet     `<shard>.parquet` with a row per sample: `key`, `caption`, `url`,
                            `status`, ..., and the image bytes in a binary column named after
                            the encode format (`jpg`; null for a failed download)

Both become tf.data streams of {"image": tf.string [] (the encoded bytes as stored, never
re-encoded), "text": tf.string [] (the caption)} with no copy of the data:
  tar      a Python pass over the tar headers (no data read) finds each sample's image and
           caption members; the bytes are then read by TF ops, a chunk of consecutive samples
           (about CHUNK_BYTES) at a time, with `tf.data.FixedLengthRecordDataset` at the chunk's
           offset, and cut into members with `tf.strings.substr`.
  parquet  one pyarrow read of the two columns per row group.
Every Python step is a pure function of a file (and row group), so the whole stream is a tf.data
pipeline whose iterator `tf.train.Checkpoint` saves and restores (a restore re-runs the function
for the files and chunks in flight). Files are sharded across hosts, shuffled and interleaved by
`seqio.FileDataSource`.

A sample without a caption member (or with a null caption) gets an empty caption, one without an
image member empty image bytes: the feature converter then drops and counts it ("empty_caption",
"bad_image") like any other unusable input. Parquet rows whose image is null are img2dataset's
record of a failed download and are skipped, as the tar format leaves them out. A damaged file (a
truncated or corrupt tar, an unreadable parquet file) raises `ShardReadError`, naming the
file: it stops the run instead of being skipped.
"""
import contextlib
import functools
import os
import tarfile
from typing import BinaryIO, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import pyarrow.fs
import pyarrow.parquet as pq
import seqio
import tensorflow as tf

from simvlm_jax.data import image_ops
from simvlm_jax.errors import DataError, UserError

# A sample's image member: its key without the dot (`image_ops` decodes these).
IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in image_ops.IMAGE_EXTENSIONS)
CHUNK_BYTES = 4 << 20  # bytes read at once from a tar (a larger sample is read on its own)
_TAR_BLOCK = 512

Shards = Union[str, Sequence[str]]  # a glob pattern, or a list of paths / patterns


class ShardReadError(DataError):
  """A shard file that cannot be read: damaged (e.g. a truncated tar), or without a column."""


def _reporting_errors(fn: Callable) -> Callable:
  """Makes every failure of `fn(path, ...)` a ShardReadError naming the file.

  Inside tf.numpy_function an IndexError or StopIteration would become OutOfRangeError, which
  tf.data takes for the end of the data and silently stops reading the file.
  """

  @functools.wraps(fn)
  def wrapper(path, *args, **kwargs):
    path = np.asarray(path).item()  # numpy_function passes bytes, or a 0-d array when eager
    path = path.decode() if isinstance(path, bytes) else path
    try:
      return fn(path, *args, **kwargs)
    except ShardReadError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise ShardReadError(f"cannot read {path}: {type(e).__name__}: {e}") from e

  return wrapper


def split_member_name(name: str) -> Optional[tuple[str, str]]:
  """(key, extension) of a tar member, as WebDataset groups them; None if the name has no dot.

  The key is the path up to the first dot of the file name; the extension, lowercased, is the
  rest ("dir/000000001.jpg" -> ("dir/000000001", "jpg")).
  """
  directory, slash, base = name.rpartition("/")
  stem, dot, extension = base.partition(".")
  if not dot or not stem:
    return None
  return directory + slash + stem, extension.lower()


def _open(path: str) -> BinaryIO:
  # tarfile parses headers 2.5x faster through Python's buffered files than through GFile, which
  # stays for the file systems only TF knows (gs://, ...).
  return tf.io.gfile.GFile(path, "rb") if "://" in path else open(path, "rb")


def _tar_members(path: str) -> tuple[int, list[tarfile.TarInfo]]:
  """(file size, the archive's file members), from the headers only; raises if damaged."""
  size = tf.io.gfile.stat(path).length
  try:
    with _open(path) as f:
      with tarfile.open(fileobj=f, mode="r:") as tar:
        members = [m for m in tar if m.isfile()]
        end = tar.offset
      # tarfile stops without a word at a corrupt header, or at the end of a file cut at a
      # member boundary; an intact archive has a zero block right there.
      f.seek(end)
      marker = f.read(_TAR_BLOCK)
  except (tarfile.TarError, tf.errors.OutOfRangeError) as e:  # GFile: a seek past the end
    raise ShardReadError(f"{path} is damaged or not a tar archive ({e})") from None
  if marker != bytes(_TAR_BLOCK):
    raise ShardReadError(f"{path} is damaged or truncated: no end-of-archive block at byte "
                         f"{end} of {size}")
  return size, members


def tar_samples(members: Iterable[tarfile.TarInfo], image_ext: Sequence[str], caption_ext: str
                ) -> Iterator[tuple[str, Optional[tarfile.TarInfo], Optional[tarfile.TarInfo]]]:
  """(key, image member or None, caption member or None) of each sample, in archive order.

  A sample is a run of consecutive members with the same key (WebDataset's grouping); its image
  is the member with the first extension of `image_ext` that it has.
  """
  samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
  for member in members:
    split = split_member_name(member.name)
    if split is None:
      continue
    key, extension = split
    if not samples or samples[-1][0] != key:
      samples.append((key, {}))
    samples[-1][1].setdefault(extension, member)
  for key, by_extension in samples:
    image = next((by_extension[e] for e in image_ext if e in by_extension), None)
    yield key, image, by_extension.get(caption_ext)


@_reporting_errors
def _tar_index(path: str, image_ext: Sequence[str], caption_ext: str,
               chunk_bytes: int) -> tuple[np.ndarray, ...]:
  """Where a tar's samples lie, grouped into chunks of consecutive samples read at once.

  Returns int64 arrays: file size []; per chunk c: start [C], length [C]; row splits [C + 1]
  (chunk c holds samples splits[c]:splits[c+1]); per sample, relative to its chunk's start:
  image position, image length, caption position, caption length [N] (length 0: no member).
  """
  size, members = _tar_members(path)
  # [N, 2 (image, caption), 2 (absolute offset, size)]; offset -1: no such member.
  spans = np.array([[(m.offset_data, m.size) if m else (-1, 0) for m in (image, caption)]
                    for _, image, caption in tar_samples(members, image_ext, caption_ext)],
                   np.int64).reshape(-1, 2, 2)
  starts, ends, splits = [], [], [0]
  for i, sample in enumerate(spans):
    present = sample[sample[:, 0] >= 0]
    if not len(present):
      continue  # nothing to read: it joins the open chunk
    begin, end = present[:, 0].min(), (present[:, 0] + present[:, 1]).max()
    if starts and end - starts[-1] <= chunk_bytes:
      ends[-1] = end
      continue
    if starts:
      splits.append(i)  # sample i opens a new chunk
    starts.append(begin)
    ends.append(end)
  if len(spans) and not starts:  # no sample has an image or a caption
    starts, ends = [0], [0]
  splits.append(len(spans))
  starts, splits = np.array(starts, np.int64), np.array(splits, np.int64)
  # FixedLengthRecordDataset needs records of >= 1 byte; the end-of-archive block (checked in
  # _tar_members) guarantees a readable byte after any member.
  lengths = np.maximum(np.array(ends, np.int64) - starts, 1)
  chunk_start = np.repeat(starts, np.diff(splits))[:, None]
  positions = np.where(spans[..., 0] >= 0, spans[..., 0] - chunk_start, 0)
  return (np.int64(size), starts, lengths, splits, positions[:, 0], spans[:, 0, 1],
          positions[:, 1], spans[:, 1, 1])


def read_tar(path: tf.Tensor, image_ext: Sequence[str] = IMAGE_EXTENSIONS,
             caption_ext: str = "txt", chunk_bytes: int = CHUNK_BYTES) -> tf.data.Dataset:
  """The samples of one WebDataset tar: {"image": tf.string [], "text": tf.string []}.

  Args:
    path: tf.string [], the tar file.
    image_ext: image member extensions, in order of preference.
    caption_ext: the caption member's extension.
    chunk_bytes: about how many bytes to read at once.
  """
  index = tf.numpy_function(
      functools.partial(_tar_index, image_ext=tuple(image_ext), caption_ext=caption_ext,
                        chunk_bytes=chunk_bytes),
      [path], [tf.int64] * 8, stateful=False)  # a pure function of the file: checkpointable
  size = tf.reshape(index[0], [])
  starts, lengths, splits, image_pos, image_len, caption_pos, caption_len = (
      tf.reshape(x, [-1]) for x in index[1:])

  def read_chunk(c: tf.Tensor) -> tf.data.Dataset:
    rows = slice(splits[c], splits[c + 1])
    images, captions = (image_pos[rows], image_len[rows]), (caption_pos[rows], caption_len[rows])
    record = tf.data.FixedLengthRecordDataset(
        path, lengths[c], header_bytes=starts[c], footer_bytes=size - starts[c] - lengths[c])
    return record.flat_map(lambda data: tf.data.Dataset.from_tensor_slices({
        "image": tf.strings.substr(data, *images), "text": tf.strings.substr(data, *captions)}))

  return tf.data.Dataset.range(tf.size(starts, out_type=tf.int64)).flat_map(read_chunk)


@contextlib.contextmanager
def _parquet_file(path: str, columns: Sequence[str]) -> Iterator[pq.ParquetFile]:
  """The open parquet file; raises unless it is readable and has `columns`.

  pyarrow opens it (a local path, or a URI of a file system pyarrow.fs knows: gs://, s3://, ...):
  pyarrow cannot read through tf.io.gfile's file objects.
  """
  filesystem, inner_path = (pyarrow.fs.FileSystem.from_uri(path) if "://" in path
                            else (pyarrow.fs.LocalFileSystem(), os.path.abspath(path)))
  with filesystem.open_input_file(inner_path) as f:
    try:
      parquet = pq.ParquetFile(f)
    except Exception as e:  # pylint: disable=broad-except
      raise ShardReadError(f"{path} is not a readable parquet file ({e})") from None
    names = parquet.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
      raise ShardReadError(f"{path} has no column {missing}; it has {names}")
    yield parquet


@_reporting_errors
def _parquet_row_groups(path: str, columns: Sequence[str]) -> np.ndarray:
  with _parquet_file(path, columns) as parquet:
    return np.int64(parquet.num_row_groups)


@_reporting_errors
def _parquet_row_group(path: str, group: int, image_column: str,
                       caption_column: str) -> tuple[np.ndarray, np.ndarray]:
  """(image bytes [n], captions [n]) of one row group; rows without an image are left out."""
  with _parquet_file(path, (image_column, caption_column)) as parquet:
    table = parquet.read_row_group(int(group), columns=[image_column, caption_column])
  images, captions = (table.column(c).to_pylist() for c in (image_column, caption_column))
  kept = [i for i, image in enumerate(images) if image is not None]
  to_bytes = lambda value: value.encode() if isinstance(value, str) else value or b""  # noqa: E731
  return (np.array([images[i] for i in kept], object),
          np.array([to_bytes(captions[i]) for i in kept], object))


def read_parquet(path: tf.Tensor, image_column: str = "jpg",
                 caption_column: str = "caption") -> tf.data.Dataset:
  """The rows of one parquet file: {"image": tf.string [], "text": tf.string []}."""
  columns = (image_column, caption_column)
  groups = tf.numpy_function(functools.partial(_parquet_row_groups, columns=columns), [path],
                             tf.int64, stateful=False)

  def read_group(group: tf.Tensor) -> tf.data.Dataset:
    images, captions = tf.numpy_function(
        functools.partial(_parquet_row_group, image_column=image_column,
                          caption_column=caption_column),
        [path, group], [tf.string, tf.string], stateful=False)
    return tf.data.Dataset.from_tensor_slices({"image": tf.reshape(images, [-1]),
                                               "text": tf.reshape(captions, [-1])})

  return tf.data.Dataset.range(tf.reshape(groups, [])).flat_map(read_group)


class ShardFileSource(seqio.FileDataSource):
  """A FileDataSource that shards by file on every host count, or says why it cannot.

  seqio.Task reads every file on every host and shards examples when a source has fewer files
  than hosts; with shards of ~10,000 examples that multiplies the reading by the number of hosts.
  Claiming arbitrary sharding makes the Task hand `shard_info` to this source, which then
  requires at least one file per host: host i reads files i, i + n, ...
  """

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, **kwargs) -> tf.data.Dataset:
    files = self.list_shards(split)
    if shard_info and len(files) < shard_info.num_shards:
      raise UserError(
          f"{len(files)} shard files ({self._split_to_filepattern[split]!r}, split {split!r}) for "
          f"{shard_info.num_shards} hosts: each host reads whole files, so give at least one file "
          "per host (img2dataset: a smaller number_sample_per_shard).")
    return super().get_dataset(split, shuffle, seed, shard_info, **kwargs)


def _splits(train: Shards, validation: Optional[Shards]) -> dict[str, Shards]:
  return {"train": train, **({"validation": validation} if validation else {})}


def webdataset_source(shards: Shards, validation_shards: Optional[Shards] = None,
                      image_ext: Sequence[str] = IMAGE_EXTENSIONS,
                      caption_ext: str = "txt") -> ShardFileSource:
  """A data source over WebDataset tars (train, and validation if given)."""
  return ShardFileSource(
      functools.partial(read_tar, image_ext=tuple(image_ext), caption_ext=caption_ext),
      _splits(shards, validation_shards))


def parquet_source(shards: Shards, validation_shards: Optional[Shards] = None,
                   image_column: str = "jpg", caption_column: str = "caption") -> ShardFileSource:
  """A data source over parquet files with image bytes and captions in columns."""
  return ShardFileSource(
      functools.partial(read_parquet, image_column=image_column, caption_column=caption_column),
      _splits(shards, validation_shards))


def tar_captions(path: str, caption_ext: str = "txt") -> Iterator[str]:
  """The captions of a WebDataset tar, in archive order (read with Python, for vocabularies)."""
  _, members = _tar_members(path)
  with _open(path) as f:
    for _, _, caption in tar_samples(members, (), caption_ext):
      if caption is not None:
        f.seek(caption.offset_data)
        yield f.read(caption.size).decode("utf-8")


def parquet_captions(path: str, caption_column: str = "caption") -> Iterator[str]:
  """The non-null captions of a parquet file, in row order."""
  with _parquet_file(path, (caption_column,)) as parquet:
    for group in range(parquet.num_row_groups):
      for caption in parquet.read_row_group(group, columns=[caption_column]).column(0).to_pylist():
        if caption is not None:
          yield caption.decode("utf-8") if isinstance(caption, bytes) else caption

