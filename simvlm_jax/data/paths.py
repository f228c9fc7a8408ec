"""Where data lives. Environment variables decide, so every process of a run agrees.

  SIMVLM_DATA_DIR   TFDS data directory (else TFDS_DATA_DIR, else ~/tensorflow_datasets)
  SIMVLM_CACHE_DIR  cache for derived artefacts such as trained vocabularies
                    (else ~/.cache/simvlm_jax)
"""
import os


def tfds_data_dir() -> str:
  """The TFDS data directory that builders write to and tasks read from."""
  path = (os.environ.get("SIMVLM_DATA_DIR") or os.environ.get("TFDS_DATA_DIR")
          or "~/tensorflow_datasets")
  return os.path.expanduser(path)


def cache_dir() -> str:
  """The directory for cached, re-derivable artefacts (e.g. SentencePiece models)."""
  return os.path.expanduser(os.environ.get("SIMVLM_CACHE_DIR") or "~/.cache/simvlm_jax")
