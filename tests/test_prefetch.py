"""The device prefetcher: batches placed ahead by a thread, and a saved position that is the
loop's (the batches it has taken), not the thread's."""
import json
import time

import jax
import numpy as np
import pytest

from simvlm_jax.data.prefetch import DevicePrefetcher
from simvlm_jax.errors import DataError


class Counting:
  """Batch i holds i (uint8 image-like rows and int32 tokens); its position is the next i."""

  def __init__(self, fail_at=None, length=None):
    self.position, self.fail_at, self.length = 0, fail_at, length
    self.reads = 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.position == self.fail_at:
      raise DataError(f"cannot read batch {self.position}")
    if self.length is not None and self.position >= self.length:
      raise StopIteration
    i, self.position = self.position, self.position + 1
    self.reads += 1
    return {"image_text": {"images": np.full((2, 4, 4, 3), i, np.uint8),
                           "text_tokens": np.full((2, 5), i, np.int32)},
            "text": {"text_tokens": np.full((1, 5), 100 + i, np.int32)}}

  def counters(self):
    return {"dropped/bad_image": self.position // 3}

  def save(self, path):
    with open(path, "w") as f:
      json.dump({"position": self.position}, f)

  def restore(self, path):
    with open(path) as f:
      self.position = json.load(f)["position"]


def _put(batch):
  return jax.tree.map(jax.numpy.asarray, batch)


def _ids(batches):
  return [int(device["image_text"]["text_tokens"][0, 0]) for _, device in batches]


def _take(prefetcher, n):
  return [next(prefetcher) for _ in range(n)]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_a_restored_position_continues_with_the_next_batch_the_loop_did_not_take(tmp_path, depth):
  data = Counting()
  feed = DevicePrefetcher(data, _put, depth=depth)
  taken = _take(feed, 3)
  assert _ids(taken) == [0, 1, 2]
  host, device = taken[-1]
  np.testing.assert_array_equal(device["text"]["text_tokens"], host["text"]["text_tokens"])
  assert isinstance(device["text"]["text_tokens"], jax.Array)
  # The thread runs ahead: `depth` batches ready, one more read and waiting for room.
  ahead = depth + 1 if depth else 0
  deadline = time.time() + 10
  while data.reads < 3 + ahead and time.time() < deadline:
    time.sleep(0.01)
  time.sleep(0.05)
  assert data.reads == 3 + ahead
  path = str(tmp_path / "position")
  feed.save(path)
  feed.close()
  # Another depth on restore (a run resumed with other settings) changes nothing.
  for other in (0, 2):
    resumed = DevicePrefetcher(Counting(), _put, depth=other)
    resumed.restore(path)
    assert _ids(_take(resumed, 5)) == [3, 4, 5, 6, 7]
    # Saved again mid-replay: the replayed batches not yet taken are held again.
    resumed.save(str(tmp_path / f"again_{other}"))
    resumed.close()
    again = DevicePrefetcher(Counting(), _put, depth=1)
    again.restore(str(tmp_path / f"again_{other}"))
    assert _ids(_take(again, 2)) == [8, 9]
    again.close()


def test_a_position_saved_without_prefetching_restores(tmp_path):
  """A checkpoint of a run without the prefetcher's file (nothing was held) restores as is."""
  plain = Counting()
  for _ in range(4):
    next(plain)
  plain.save(str(tmp_path / "p"))
  feed = DevicePrefetcher(Counting(), _put, depth=2)
  feed.restore(str(tmp_path / "p"))
  assert _ids(_take(feed, 2)) == [4, 5]
  feed.close()


def test_errors_and_the_end_reach_the_loop_in_order():
  feed = DevicePrefetcher(Counting(fail_at=2), _put, depth=2)
  assert _ids(_take(feed, 2)) == [0, 1]
  for _ in range(2):  # and every later call
    with pytest.raises(DataError, match="cannot read batch 2"):
      next(feed)
  feed.close()
  feed = DevicePrefetcher(Counting(length=3), _put, depth=2)
  assert _ids(list(feed)) == [0, 1, 2]
  with pytest.raises(StopIteration):
    next(feed)
  feed.close()


def test_the_iterators_attributes_pass_through_and_restore_comes_first(tmp_path):
  data = Counting()
  data.vocabulary = "vocab"
  feed = DevicePrefetcher(data, _put, depth=2)
  assert feed.vocabulary == "vocab" and feed.counters() == {"dropped/bad_image": 0}
  with pytest.raises(AttributeError):
    feed.answers  # pylint: disable=pointless-statement
  next(feed)
  with pytest.raises(RuntimeError, match="restore a prefetcher before taking a batch"):
    feed.restore(str(tmp_path / "x"))
  feed.close()
  with pytest.raises(ValueError, match="prefetch depth must be an integer >= 0"):
    DevicePrefetcher(data, _put, depth=-1)


def _wait_for(condition, timeout=10.0):
  deadline = time.time() + timeout
  while not condition() and time.time() < deadline:
    time.sleep(0.01)
  assert condition()


def test_paused_holds_the_thread_between_batches():
  """The train loop pauses the thread around a profiler's start and stop."""
  data = Counting()
  feed = DevicePrefetcher(data, _put, depth=2)
  next(feed)
  _wait_for(lambda: data.reads == 4)  # 1 taken, 2 ready, 1 read and waiting for room
  with feed.paused():
    assert _ids(_take(feed, 2)) == [1, 2]  # room in the queue, but no new read
    time.sleep(0.2)
    assert data.reads == 4
  _wait_for(lambda: data.reads == 6)
  assert _ids(_take(feed, 3)) == [3, 4, 5]
  feed.close()
