"""Synthetic batches: a deterministic function of (seed, step), for tests and benchmarks.

The iterator follows the data iterator protocol of `simvlm_jax.data` (`__next__`, `save`,
`restore`, `counters`, `element_spec`) so the train loop treats it like the real pipeline.
"""
import json

import gin
import jax
import numpy as np


def synthetic_batch(seed: int, step: int, image_text_batch: int, image_text_length: int,
                    text_batch: int, text_length: int, image_size: int, vocab_size: int) -> dict:
  """Random images and EOS-terminated token rows of random length (at least 2 tokens)."""
  rng = np.random.default_rng([seed, step])

  def tokens(rows, length):
    lengths = rng.integers(2, length + 1, size=rows)
    out = rng.integers(3, vocab_size, size=(rows, length)).astype(np.int32)
    pos = np.arange(length)[None]
    out = np.where(pos < lengths[:, None] - 1, out, 0)
    out[np.arange(rows), lengths - 1] = 1  # EOS
    return out

  images = rng.integers(0, 256, size=(image_text_batch, image_size, image_size, 3), dtype=np.uint8)
  return {"image_text": {"images": images, "text_tokens": tokens(image_text_batch, image_text_length)},
          "text": {"text_tokens": tokens(text_batch, text_length)}}


@gin.configurable
class SyntheticIterator:
  """Synthetic batches; its position is the number of batches already produced.

  Endless by default. Batch sizes are global: this process gets rows
  `[shard_index * B / num_shards, ...)` of each sub-batch, so any number of processes together see
  the same global batch.

  `num_examples=N` makes one finite pass instead, as an eval split read by several hosts: global
  batch t holds examples [t * B, (t + 1) * B), each host its contiguous block of B / num_shards
  rows, so every example sits at the same global row on any number of hosts (the PrefixLM split of
  a row depends on its row index) while the hosts' shards differ in size (9 examples, 2 hosts,
  B = 8: 5 and 4, and host 1 has no second batch). A host's last batch is padded with zero rows.
  """

  def __init__(self, image_text_batch: int = 8, image_text_length: int = 16, text_batch: int = 4,
               text_length: int = 32, image_size: int = 32, vocab_size: int = 128, seed: int = 0,
               shard_index: int = 0, num_shards: int = 1, num_examples: int = 0):
    for name, rows in (("image_text_batch", image_text_batch), ("text_batch", text_batch)):
      if rows % num_shards:
        raise ValueError(f"{name}={rows} is not divisible by {num_shards} processes")
    self.shard_index, self.num_shards = shard_index, num_shards
    self.kwargs = dict(image_text_batch=image_text_batch, image_text_length=image_text_length,
                       text_batch=text_batch, text_length=text_length, image_size=image_size,
                       vocab_size=vocab_size)
    self.seed = seed
    self.position = 0
    self.num_examples = num_examples

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.num_examples:
      return self._next_finite()
    batch = synthetic_batch(self.seed, self.position, **self.kwargs)
    self.position += 1
    return {kind: {k: np.array_split(v, self.num_shards)[self.shard_index] for k, v in sub.items()}
            for kind, sub in batch.items()}

  def _next_finite(self) -> dict:
    """The next batch of this shard's examples (each the image-text row of its own draw)."""
    rows = self.kwargs["image_text_batch"] // self.num_shards
    first = self.position * self.kwargs["image_text_batch"] + self.shard_index * rows
    ids = np.arange(first, min(first + rows, self.num_examples))
    if not len(ids):
      raise StopIteration
    self.position += 1
    batch = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), self.element_spec)
    for row, i in enumerate(ids):
      example = synthetic_batch(self.seed, int(i), **{**self.kwargs, "image_text_batch": 1})
      for k, v in example["image_text"].items():
        batch["image_text"][k][row] = v[0]
    return batch

  @property
  def element_spec(self) -> dict:
    """{sub-batch: {feature: jax.ShapeDtypeStruct}} of this host's batches."""
    batch = synthetic_batch(self.seed, 0, **self.kwargs)
    return {kind: {k: jax.ShapeDtypeStruct((v.shape[0] // self.num_shards,) + v.shape[1:], v.dtype)
                   for k, v in sub.items()} for kind, sub in batch.items()}

  def save(self, path: str):
    with open(path + ".json", "w") as f:
      json.dump({"position": self.position}, f)

  def restore(self, path: str):
    with open(path + ".json") as f:
      self.position = json.load(f)["position"]

  def counters(self) -> dict:
    return {}
