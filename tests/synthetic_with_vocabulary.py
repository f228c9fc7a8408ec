"""A test-only data iterator: synthetic batches that claim a SentencePiece vocabulary, so a train
command with no data to build meets the run directory's vocabulary checks
(`--import_modules=synthetic_with_vocabulary` with tests/ on PYTHONPATH)."""
import gin
import seqio

from simvlm_jax.data.synthetic import SyntheticIterator


@gin.configurable
class SyntheticWithVocabulary(SyntheticIterator):
  def __init__(self, model_path: str = gin.REQUIRED, **kwargs):
    super().__init__(**kwargs)
    self.vocabulary = seqio.SentencePieceVocabulary(model_path)
