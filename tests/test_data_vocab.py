"""SentencePiece vocabularies: T5 ids, round trips, deterministic cached training, gin override,
`python -m tasks.build vocab --from` on your own text, and span corruption's sentinels."""
import io
import json
import os
import tarfile

import gin
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio
import sentencepiece as spm

import tasks
from simvlm_jax import objectives
from simvlm_jax.data import vocab
from simvlm_jax.errors import UserError
from tasks import build, shapes_world

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


def _write_corpus(folder) -> list[str]:
  """Text in every format `vocab --from` reads; returns the sentences in reading order."""
  half = len(SENTENCES) // 2
  (folder / "a.txt").write_text("\n".join(SENTENCES[:half]) + "\n\n   \n")
  (folder / "b.jsonl").write_text("\n".join(
      json.dumps({"image": f"{i}.jpg", "caption": s}) for i, s in enumerate(SENTENCES[half:])))
  (folder / "c.tsv").write_text("a  tsv\tcaption\thttp://x/1.jpg\nanother one\thttp://x/2.jpg\n")
  with tarfile.open(folder / "d.tar", "w") as tar:
    for name, data in [("000000000.jpg", b"\xff\xd8"), ("000000000.txt", b"a caption in a tar"),
                       ("000000001.txt", b"")]:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  pq.write_table(pa.table({"caption": ["a parquet caption", None], "jpg": [b"x", None]}),
                 folder / "e.parquet")
  return (SENTENCES + ["a tsv", "another one", "a caption in a tar", "a parquet caption"])


def test_corpus_sentences_reads_every_format_in_order(tmp_path):
  expected = _write_corpus(tmp_path)
  patterns = [str(tmp_path / "[ab].*"), str(tmp_path / "c.tsv"), str(tmp_path / "*.tar"),
              str(tmp_path / "e.parquet")]
  assert list(tasks.vocabularies.corpus_sentences(patterns)) == expected
  with pytest.raises(ValueError, match=r"b.jsonl:1 has no 'text' key"):
    list(tasks.vocabularies.corpus_sentences(str(tmp_path / "b.jsonl"), field="text"))


def test_build_vocab_from_your_own_text(tmp_path, capsys):
  _write_corpus(tmp_path)
  outputs = []
  for run in ("first", "second"):  # separate caches: the second run trains again
    with pytest.MonkeyPatch.context() as patch:
      patch.setenv("SIMVLM_CACHE_DIR", str(tmp_path / f"cache_{run}"))
      output = str(tmp_path / f"{run}.model")
      build.main(["vocab", "--from", str(tmp_path / "*.*"), "--vocab_size", "300",
                  "--output", output])
      outputs.append(output)
  assert f"sentencepiece_vocabulary.model_path = '{outputs[1]}'" in capsys.readouterr().out
  with open(outputs[0], "rb") as f, open(outputs[1], "rb") as g:
    assert f.read() == g.read()
  processor = spm.SentencePieceProcessor(model_file=outputs[0])
  assert (processor.pad_id(), processor.eos_id(), processor.unk_id(), processor.bos_id()) == (
      0, 1, 2, -1)
  assert processor.get_piece_size() == 300
  # Pieces learned from the corpus: words in every sentence.
  assert processor.encode("to the left of", out_type=str) == ["▁to", "▁the", "▁left", "▁of"]
  unseen = "zebra 日本 ✓ ß"
  ids = processor.encode(unseen)
  assert processor.unk_id() not in ids and processor.decode(ids) == unseen


def test_build_vocab_flags_need_from(capsys):
  with pytest.raises(SystemExit):
    build.main(["vocab", "--vocab_size", "300"])
  assert "--vocab_size need --from" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    build.main(["vocab", "--from", "x.txt", "--vocab_size", "259"])
  assert "--vocab_size must be > 259" in capsys.readouterr().err


def test_span_corruption_sentinels_are_the_vocabularys_extra_ids(shapes_model):
  vocabulary = seqio.SentencePieceVocabulary(shapes_model, extra_ids=100)
  objective = objectives.for_vocabulary(objectives.span_corruption, vocabulary)
  ids = vocabulary.encode("a small red circle to the left of a big blue square on a noisy "
                          "background, two shapes in total") + [1]
  tokens = jnp.asarray([ids + [0] * (48 - len(ids))] * 8)
  out = objective(tokens, objectives.row_keys(0, 0, jnp.arange(8)), with_image=True)
  for inputs, targets in zip(np.asarray(out["prefix_tokens"]),
                             np.asarray(out["decoder_target_tokens"])):
    sentinels = [int(t) for t in inputs if t >= tasks.SHAPES_VOCAB_SIZE]
    assert sentinels and [vocabulary.decode([s]) for s in sentinels] == [
        f"<extra_id_{i}>" for i in range(len(sentinels))]
    assert int(targets[0]) == sentinels[0] == vocabulary.vocab_size - 1
  # No extra ids, no sentinels: refused before training, not trained on real pieces.
  with pytest.raises(UserError, match="span corruption needs sentinel ids"):
    objectives.for_vocabulary(objectives.span_corruption,
                              seqio.SentencePieceVocabulary(shapes_model))
  assert objectives.for_vocabulary(objectives.prefix_lm, None) is objectives.prefix_lm


def test_deferred_vocabulary_follows_the_gin_config_it_is_used_under(shapes_model):
  """One process, one config after another (the demo, benchmarks/ablations.py): each use of a
  task's vocabulary reads that config's extra ids, so span corruption's run after a PrefixLM run
  gets its sentinels, and the next PrefixLM run none."""
  vocabulary = vocab.DeferredSentencePieceVocabulary(lambda: shapes_model)
  sizes = []
  for extra_ids in (0, 100, 0):
    gin.clear_config()
    gin.bind_parameter("sentencepiece_vocabulary.extra_ids", extra_ids)
    sizes.append(vocabulary.vocab_size)
    assert vocabulary.decode([vocabulary.vocab_size - 1]) == (
        "<extra_id_0>" if extra_ids else vocabulary.decode([tasks.SHAPES_VOCAB_SIZE - 1]))
  gin.clear_config()
  assert sizes == [512, 612, 512]
