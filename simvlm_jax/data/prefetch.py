"""Batches made ready on the devices ahead of the step that takes them (big_vision's
`prefetch_iterator`, with a checkpointable position).

A background thread reads host batches from the data iterator and transfers them to the devices
(`put`, e.g. `Partitioner.shard_batch`), keeping up to `depth` ready, so neither the input
pipeline nor the host-to-device copy sits between two steps.

The position saved with a checkpoint is the loop's, not the thread's: the wrapped iterator's
position plus the host batches it has read that the loop has not taken yet (`<path>.pending.npz`).
A restored prefetcher hands those out first, so a resumed run sees exactly the batches a run
without prefetching would.
"""
import collections
import contextlib
import io
import queue
import threading
import zipfile
from typing import Any, Callable, Iterator

import numpy as np
from etils import epath

_DONE = object()  # the wrapped iterator ended (an eval stream)


class DevicePrefetcher(Iterator[tuple[Any, Any]]):
  """Yields (host batch, device batch); `save` / `restore` / `counters` and the data iterator's
  other attributes (`vocabulary`, `answers`, `element_spec`) pass through. `depth` 0 reads and
  places each batch when it is asked for (no thread), still replaying a restored position's
  held batches."""

  def __init__(self, data: Any, put: Callable[[Any], Any], depth: int = 2):
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
      raise ValueError(f"the prefetch depth must be an integer >= 0, got {depth!r}")
    self._data, self._put, self._depth = data, put, depth
    self._lock = threading.Lock()  # the thread's read-and-place, against `save` and `paused`
    self._pending = collections.deque()  # read from `data` (or replayed), not yet taken
    self._replay = collections.deque()  # restored pending batches, handed out before `data`'s
    self._ready: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._thread = None

  def __getattr__(self, name: str) -> Any:
    return getattr(self._data, name)

  def __iter__(self) -> "DevicePrefetcher":
    return self

  def __next__(self) -> tuple[Any, Any]:
    if not self._depth:  # no thread: read and place each batch when it is asked for
      host = self._replay.popleft() if self._replay else next(self._data)
      return host, self._put(host)
    if self._thread is None:
      self._thread = threading.Thread(target=self._produce, name="device-prefetch", daemon=True)
      self._thread.start()
    item = self._ready.get()
    if item is _DONE:
      self._ready.put(_DONE)  # every later call ends too
      raise StopIteration
    if isinstance(item, BaseException):
      self._ready.put(item)
      raise item
    # No lock: the thread only appends (deque ends are thread-safe), and `save` runs in this
    # thread, so waiting here for the thread's batch in flight would put it back on the step.
    self._pending.popleft()
    return item

  def _produce(self) -> None:
    while not self._stop.is_set():
      try:
        with self._lock:  # held while reading and placing: `paused` waits for a whole item
          host = self._replay.popleft() if self._replay else next(self._data)
          self._pending.append(host)
          item = (host, self._put(host))
      except StopIteration:
        item = _DONE
      except BaseException as e:  # pylint: disable=broad-except  (raised in the loop's thread)
        item = e
      while not self._stop.is_set():
        try:
          self._ready.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item is _DONE or isinstance(item, BaseException):
        return

  @contextlib.contextmanager
  def paused(self):
    """Holds the thread between batches (it neither reads nor places one) for the duration:
    starting and stopping a profiler trace while another thread moves data to the devices is
    where JAX runs have crashed (a segfault at `stop_trace`)."""
    with self._lock:
      yield

  def close(self) -> None:
    """Stops the thread (batches it holds are dropped; a checkpoint saved earlier keeps them)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def counters(self) -> dict:
    return self._data.counters()

  def save(self, path: str) -> None:
    with self._lock:
      self._data.save(path)
      held = list(self._pending) + list(self._replay)
    buffer = io.BytesIO()
    flat = {f"{i}/{key}/{name}": value for i, batch in enumerate(held)
            for key, sub in batch.items() for name, value in sub.items()}
    np.savez(buffer, count=np.int64(len(held)), **flat)
    epath.Path(f"{path}.pending.npz").write_bytes(buffer.getvalue())

  def restore(self, path: str) -> None:
    if self._thread is not None:
      raise RuntimeError("restore a prefetcher before taking a batch from it")
    self._data.restore(path)
    pending = epath.Path(f"{path}.pending.npz")
    self._replay.clear()
    if not pending.exists():  # written without prefetching: nothing was held
      return
    try:
      with np.load(io.BytesIO(pending.read_bytes())) as arrays:
        batches = [{} for _ in range(int(arrays["count"]))]
        for name in arrays.files:
          if name != "count":
            i, key, feature = name.split("/", 2)
            batches[int(i)].setdefault(key, {})[feature] = arrays[name]
    except (zipfile.BadZipFile, EOFError, KeyError, IndexError, ValueError) as e:
      # A ValueError is what a checkpoint reader takes for "this checkpoint is damaged".
      raise ValueError(f"the held batches in {pending} cannot be read: {e}") from e
    self._replay.extend(batches)
