"""SentencePiece vocabularies with T5 ids (pad 0, eos 1, unk 2), and deterministic training.

Tasks are registered when `tasks` is imported, which can be before gin has parsed the run's
bindings. `DeferredSentencePieceVocabulary` therefore looks up its model file on first use:

  sentencepiece_vocabulary.model_path = "/path/to/t5/spiece.model"   # any T5-style model
  sentencepiece_vocabulary.extra_ids = 100                           # e.g. T5's 32000 + 100

and falls back to the default its task set gave it (for the shapes world: a small model trained
from the world's own text, see `train_sentencepiece`).
"""
import hashlib
import io
import json
import os
import re
from typing import Callable, Iterable, Optional

import gin
import seqio
import sentencepiece as spm
import tensorflow as tf

from simvlm_jax.data import paths
from simvlm_jax.errors import UserError

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


@gin.configurable
def sentencepiece_vocabulary(model_path: Optional[str] = None,
                             extra_ids: int = 0) -> tuple[Optional[str], int]:
  """Run-wide vocabulary settings (gin). model_path=None keeps each task's default model."""
  return model_path, extra_ids


class DeferredSentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """A seqio.SentencePieceVocabulary whose model file is resolved on first use.

  Resolution order: gin `sentencepiece_vocabulary.model_path`, else `default_model()` (a
  module-level function, so the vocabulary stays picklable for gin). `extra_ids` comes from gin.
  Every use rereads those two settings, so a process that runs one config after another (the
  demo, `benchmarks/ablations.py`) tokenizes each with its own vocabulary.
  """

  def __init__(self, default_model: Callable[[], str]):
    super().__init__(sentencepiece_model_file="")
    self._default_model = default_model
    self._settings = None

  def _resolve(self) -> None:
    settings = sentencepiece_vocabulary()
    if settings != self._settings:
      model_path, extra_ids = settings
      self._sentencepiece_model_file = model_path or self._default_model()
      self._extra_ids = extra_ids
      self._model = None  # seqio's loaded model (and its extra ids): load it again
      self._settings = settings

  @property
  def sentencepiece_model_file(self) -> str:
    self._resolve()
    return self._sentencepiece_model_file

  @property
  def extra_ids(self) -> int:
    self._resolve()
    return self._extra_ids

  def _model_context(self):
    self._resolve()
    if self._model is None:
      check_t5_ids(super()._model_context().tokenizer, self._sentencepiece_model_file)
    return super()._model_context()


def check_t5_ids(processor: spm.SentencePieceProcessor, name: str) -> None:
  """Raises unless pad, eos and unk have the ids every part of the project assumes."""
  ids = (processor.pad_id(), processor.eos_id(), processor.unk_id())
  if ids != (PAD_ID, EOS_ID, UNK_ID):
    raise ValueError(f"SentencePiece model {name} has (pad, eos, unk) ids {ids}; this project "
                     f"needs T5-style ids {(PAD_ID, EOS_ID, UNK_ID)}.")


def train_sentencepiece(sentences: Iterable[str], vocab_size: int, name: str,
                        model_type: str = "bpe", byte_fallback: bool = True,
                        directory: Optional[str] = None) -> str:
  """Trains (or finds in the cache) a T5-style SentencePiece model; returns its path.

  Deterministic: one thread, the sentences in the given order, fixed settings, so equal inputs
  give byte-identical models. The file name carries a hash of the corpus and the settings, so a
  changed corpus trains a new model instead of reusing a stale one.

  Args:
    sentences: the training text, one sentence per item.
    vocab_size: pieces in the model, pad/eos/unk (and the 256 byte pieces if byte_fallback)
      included; this is the model's `vocab_size` when no extra ids are added.
    name: file name prefix in the cache.
    model_type: "bpe" or "unigram".
    byte_fallback: spell unseen characters as UTF-8 bytes, so any text round-trips.
    directory: cache directory (default: `paths.cache_dir()/sentencepiece`).
  """
  sentences = list(sentences)
  settings = dict(vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback,
                  pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
                  character_coverage=1.0, hard_vocab_limit=True, num_threads=1)
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
  digest.update(spm.__version__.encode())
  for sentence in sentences:
    digest.update(sentence.encode() + b"\n")
  directory = directory or os.path.join(paths.cache_dir(), "sentencepiece")
  path = os.path.join(directory, f"{name}_{vocab_size}_{digest.hexdigest()[:16]}.model")
  if tf.io.gfile.exists(path):
    return path

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model,
                                   minloglevel=2, **settings)
  except RuntimeError as e:
    most = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)",
                     str(e))
    if most is None:
      raise
    raise UserError(f"{len(sentences)} sentences give at most {most.group(2)} pieces, not "
                    f"{most.group(1)}: give more text or a smaller vocabulary size") from None
  tf.io.gfile.makedirs(directory)
  # Write then rename: concurrent processes (one per host) never see a half-written file.
  tmp = f"{path}.tmp{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(model.getvalue())
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return path
