"""The vocabulary every task of this package tokenizes with.

By default a SentencePiece model trained from the shapes world's own text (BPE, byte fallback, so
any text still round-trips) and cached under SIMVLM_CACHE_DIR. A gin binding swaps in any
T5-style model for every task at once, e.g. the standard 32k T5 vocabulary:

  sentencepiece_vocabulary.model_path = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
  sentencepiece_vocabulary.extra_ids = 100

The model's vocab_size must equal `VOCABULARY.vocab_size` (SHAPES_VOCAB_SIZE for the default).
`python -m tasks.build vocab --from <files>` trains such a model on your own captions and text
(`corpus_sentences` reads them).
"""
import json
import os
from typing import Iterator, Sequence, Union

import seqio
import tensorflow as tf

from simvlm_jax.data import vocab
from tasks import shapes_world, webdataset

SHAPES_VOCAB_SIZE = 512  # pad/eos/unk + 256 byte pieces + 253 learned pieces


def shapes_sentencepiece_model() -> str:
  """Path of the shapes-world SentencePiece model (trained on first use, then cached)."""
  return vocab.train_sentencepiece(shapes_world.corpus(), SHAPES_VOCAB_SIZE, name="shapes_world")


VOCABULARY = vocab.DeferredSentencePieceVocabulary(shapes_sentencepiece_model)


def corpus_sentences(patterns: Union[str, Sequence[str]], field: str = "caption",
                     caption_ext: str = "txt") -> Iterator[str]:
  """The sentences of text files, in a fixed order: files as listed (globs sorted), then lines.

  By extension: .txt (and any other: a sentence a line), .jsonl (the `field` of each object),
  .tsv (the first column: CC3M's caption <TAB> url), .tar (WebDataset; the `caption_ext`
  members), .parquet (the `field` column). Whitespace runs become one space; blank sentences
  are left out.
  """
  for path in seqio.utils.list_files(patterns):
    for sentence in _file_sentences(path, field, caption_ext):
      sentence = " ".join(sentence.split())
      if sentence:
        yield sentence


def _file_sentences(path: str, field: str, caption_ext: str) -> Iterator[str]:
  extension = os.path.splitext(path)[1].lower()
  if extension == ".tar":
    yield from webdataset.tar_captions(path, caption_ext)
  elif extension == ".parquet":
    yield from webdataset.parquet_captions(path, field)
  else:
    with tf.io.gfile.GFile(path) as f:
      for number, line in enumerate(f, 1):
        if extension == ".tsv":
          yield line.partition("\t")[0]
        elif extension != ".jsonl":
          yield line
        elif line.strip():
          record = json.loads(line)
          if field not in record:
            raise ValueError(f"{path}:{number} has no {field!r} key (keys: {sorted(record)})")
          yield record[field] or ""
