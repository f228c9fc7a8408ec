"""The data side of training: host-sharded, checkpointable batches from SeqIO tasks and mixtures.

Import the submodule you need; this package imports nothing, so `simvlm_jax.data.synthetic` stays
free of TensorFlow.

  paths              where TFDS data and the vocabulary cache live (env-configurable)
  vocab              SentencePiece vocabularies with T5 ids; deterministic, cached training
  image_ops          decode any JPEG/PNG to RGB uint8; crop and resize for train or eval
  feature_converter  task examples -> fixed-shape model batches (two sub-batches), drop counting
  iterator           the host iterator: numpy batches, save/restore of its position, counters
  pipeline           gin entry points: make_pretrain_iterator, make_eval_iterator
  synthetic          random batches with the same contract, for tests and benchmarks

The library never imports `tasks/`; whoever builds an iterator imports `tasks` (or any module
that registers SeqIO tasks) first, so the names resolve.
"""
