"""The vocabulary every task of this package tokenizes with.

By default a SentencePiece model trained from the shapes world's own text (BPE, byte fallback, so
any text still round-trips) and cached under SIMVLM_CACHE_DIR. A gin binding swaps in any
T5-style model for every task at once, e.g. the standard 32k T5 vocabulary:

  sentencepiece_vocabulary.model_path = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
  sentencepiece_vocabulary.extra_ids = 100

The model's vocab_size must equal `VOCABULARY.vocab_size` (SHAPES_VOCAB_SIZE for the default).
"""
from simvlm_jax.data import vocab

from tasks import shapes_world

SHAPES_VOCAB_SIZE = 512  # pad/eos/unk + 256 byte pieces + 253 learned pieces


def shapes_sentencepiece_model() -> str:
  """Path of the shapes-world SentencePiece model (trained on first use, then cached)."""
  return vocab.train_sentencepiece(shapes_world.corpus(), SHAPES_VOCAB_SIZE, name="shapes_world")


VOCABULARY = vocab.DeferredSentencePieceVocabulary(shapes_sentencepiece_model)
