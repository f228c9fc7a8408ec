"""SentencePiece vocabularies: T5 ids, round trips, deterministic cached training, gin override."""
import io
import os

import gin
import pytest
import sentencepiece as spm

import tasks
from simvlm_jax.data import vocab
from tasks import shapes_world

SENTENCES = [f"a {size} {colour} {shape} to the left of a {shape2}"
             for size in ("small", "large") for colour in shapes_world.COLOURS
             for shape in shapes_world.SHAPES for shape2 in ("circle", "star")]


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
  """The default shapes-world model, trained into a test-private cache directory."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("SIMVLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    return tasks.vocabularies.shapes_sentencepiece_model()


def test_shapes_vocabulary_has_t5_ids_and_the_declared_size(shapes_model):
  processor = spm.SentencePieceProcessor(model_file=shapes_model)
  assert (processor.pad_id(), processor.eos_id(), processor.unk_id()) == (0, 1, 2)
  assert processor.bos_id() == -1
  assert processor.get_piece_size() == tasks.SHAPES_VOCAB_SIZE


@pytest.mark.parametrize("text", [
    "a small red circle to the left of a large blue square",
    "the big triangle in orange is right of a small star in cyan. a red cross and a star",
    "words the world never says: zebra, 42 ünïcödé ✓ 日本",  # byte fallback, no unk
])
def test_round_trip(shapes_model, text):
  processor = spm.SentencePieceProcessor(model_file=shapes_model)
  ids = processor.encode(text)
  assert processor.unk_id() not in ids
  assert processor.decode(ids) == text


def test_world_words_are_single_pieces(shapes_model):
  processor = spm.SentencePieceProcessor(model_file=shapes_model)
  for word in [*shapes_world.COLOURS, *shapes_world.SHAPES, "small", "large", "left", "above"]:
    assert len(processor.encode(word)) == 1, word


def test_training_is_deterministic_and_cached(tmp_path):
  first = vocab.train_sentencepiece(SENTENCES, 300, name="t", directory=str(tmp_path / "a"))
  second = vocab.train_sentencepiece(SENTENCES, 300, name="t", directory=str(tmp_path / "b"))
  assert os.path.basename(first) == os.path.basename(second)
  with open(first, "rb") as f, open(second, "rb") as g:
    assert f.read() == g.read()
  mtime = os.path.getmtime(first)
  assert vocab.train_sentencepiece(SENTENCES, 300, name="t", directory=str(tmp_path / "a")) == first
  assert os.path.getmtime(first) == mtime  # a cache hit, not a retrain
  changed = vocab.train_sentencepiece(SENTENCES[1:], 300, name="t", directory=str(tmp_path / "a"))
  assert changed != first  # the corpus is part of the cache key


def test_deferred_vocabulary_follows_gin(tmp_path):
  other = vocab.train_sentencepiece(SENTENCES, 300, name="other", directory=str(tmp_path))
  default_calls = []

  def default():
    default_calls.append(1)
    return other

  try:
    gin.parse_config(["sentencepiece_vocabulary.model_path = %r" % other,
                      "sentencepiece_vocabulary.extra_ids = 10"])
    deferred = vocab.DeferredSentencePieceVocabulary(default)
    assert deferred.vocab_size == 310
    assert deferred.extra_ids == 10
    assert deferred.sentencepiece_model_file == other
    assert not default_calls  # the gin path wins; the default is never built
    ids = deferred.encode("a small red circle")
    assert deferred.decode(ids) == "a small red circle"
    assert deferred.eos_id == 1
  finally:
    gin.clear_config()
  fallback = vocab.DeferredSentencePieceVocabulary(default)
  assert fallback.vocab_size == 300 and default_calls == [1]


def test_a_model_without_t5_ids_is_rejected(tmp_path):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=model,
                                 vocab_size=40, minloglevel=2)  # default ids: unk 0, bos 1, eos 2
  path = tmp_path / "not_t5.model"
  path.write_bytes(model.getvalue())
  deferred = vocab.DeferredSentencePieceVocabulary(lambda: str(path))
  with pytest.raises(ValueError, match="T5-style ids"):
    deferred.encode("a circle")


def test_tasks_share_one_vocabulary():
  image_text = tasks.pretraining.IMAGE_TEXT_FEATURES["text"].vocabulary
  text = tasks.pretraining.TEXT_FEATURES["text"].vocabulary
  assert image_text is text is tasks.VOCABULARY
  # The feature converter appends EOS, so the tasks do not.
  assert not any(f.add_eos for f in tasks.pretraining.TEXT_FEATURES.values())
