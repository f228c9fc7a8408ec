r"""Text for images from a trained checkpoint: captions, or answers to a prompt.

  python -m simvlm_jax.predict --checkpoint_dir=/tmp/simvlm_demo/pretrain \
      --image='my_images/*.png' --prompt="a picture of" --beam_size=4 --format=json

The model, its vocabulary and its image size come from the `config.gin` saved in the model
directory, so no model flags are repeated here. One result per image, in the order given.
"""
import glob
import json
import os
import sys
from typing import List, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from simvlm_jax import checkpoints, decoding, distributed, gin_utils
from simvlm_jax import train  # noqa: F401  (registers `train`, which saved configs bind)
from simvlm_jax.errors import UserError, run_main
from simvlm_jax.models import ModelConfig
from simvlm_jax.partitioning import Partitioner
from simvlm_jax.trainer import Trainer


class Predictor:
  """Restores a checkpoint with its saved gin config and decodes from it.

  Args:
    model_dir: a `train.model_dir` (holds `config.gin` and `checkpoints/`).
    step: the checkpoint step (default: the latest).
  """

  def __init__(self, model_dir: str, step: Optional[int] = None):
    config_path = os.path.join(model_dir, "config.gin")
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    if not os.path.isfile(config_path):
      raise UserError(f"{config_path} not found: --checkpoint_dir must be the model_dir of "
                      "a training run (it holds config.gin and checkpoints/)")
    gin.clear_config()
    gin_utils.parse_gin([config_path], [])
    self.config = ModelConfig()
    self.vocabulary = _vocabulary_of_run()
    if self.vocabulary.vocab_size != self.config.vocab_size:
      raise UserError(f"model/vocabulary mismatch: the model has {self.config.vocab_size} "
                      f"token ids but the vocabulary has {self.vocabulary.vocab_size}")
    if not os.path.isdir(ckpt_dir):
      raise UserError(f"no checkpoint in {model_dir} (expected {ckpt_dir}/<step>/)")
    trainer = Trainer(self.config, Partitioner((1, 1, 1), devices=jax.devices()[:1]),
                      total_steps=1)
    ckpt = checkpoints.Checkpointer(ckpt_dir)
    if ckpt.latest_step() is None:
      raise UserError(f"no checkpoint in {ckpt_dir}")
    self.step = ckpt.latest_step() if step is None else step
    self.params = ckpt.restore_params(trainer.abstract_state.params, step=self.step)
    ckpt.close()
    self.model = trainer.model
    self._decoders = {}

  def _decoder(self, beam_size: int, max_decode_length: int):
    key = (beam_size, max_decode_length)
    if key not in self._decoders:
      method = "beam" if beam_size > 1 else "greedy"
      fn = decoding.make_decode_fn(self.model, method=method, max_decode_length=max_decode_length,
                                   beam_size=max(beam_size, 1))
      self._decoders[key] = jax.jit(fn)
    return self._decoders[key]

  def encode_prompt(self, prompts: Sequence[str]) -> np.ndarray:
    """Prompt token ids (no EOS: the model continues them), 0-padded, `[batch, length]`."""
    ids = [self.vocabulary.encode(p) for p in prompts]
    length = max(1, max(len(i) for i in ids))
    return np.array([i + [0] * (length - len(i)) for i in ids], np.int32)

  def generate(self, images: Optional[np.ndarray], prompts: Sequence[str], beam_size: int = 1,
               max_decode_length: int = 32) -> List[dict]:
    """`images`: uint8 `[batch, H, W, 3]` at the model's size (or None for text only)."""
    out = self._decoder(beam_size, max_decode_length)(
        self.params, None if images is None else jnp.asarray(images),
        jnp.asarray(self.encode_prompt(prompts)))
    tokens, scores = jax.device_get((out.tokens, out.scores))
    results = []
    for row, score in zip(tokens, scores):
      ids = [int(t) for t in row]
      ids = ids[:ids.index(decoding.EOS_ID)] if decoding.EOS_ID in ids else ids
      results.append({"prediction": self.vocabulary.decode(ids), "score": float(score)})
    return results


def _vocabulary_of_run():
  """The vocabulary of the run's training data (tasks are registered by the config's imports)."""
  from simvlm_jax.data import pipeline  # TensorFlow/seqio only when predicting from real data.
  try:
    name = gin.query_parameter("make_pretrain_iterator.mixture_or_task_name")
  except ValueError:
    raise UserError("the run's config.gin names no training task, so its vocabulary is "
                    "unknown (was it trained on synthetic data?)") from None
  return pipeline.vocabulary(name)


def load_image(path: str, size: int) -> np.ndarray:
  """Any JPEG/PNG -> uint8 `[size, size, 3]` (centre crop), with a clear error if unreadable."""
  import tensorflow as tf
  from simvlm_jax.data import image_ops
  try:
    with open(path, "rb") as f:
      encoded = f.read()
    image = image_ops.decode_rgb(tf.constant(encoded))
    return image_ops.crop_and_resize(image, (size, size)).numpy()
  except (OSError, tf.errors.InvalidArgumentError) as e:
    raise UserError(f"cannot read image {path}: {str(e).splitlines()[0]}") from None


def expand_images(pattern: str) -> List[str]:
  paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
  if not paths:
    raise UserError(f"no image matches {pattern!r}")
  return paths


def _define_flags():
  flags.DEFINE_string("checkpoint_dir", None, "model_dir of a training run.", required=True)
  flags.DEFINE_string("image", None, "An image path or glob.", required=True)
  flags.DEFINE_string("image2", None, "Second image (two-image models, e.g. NLVR2).")
  flags.DEFINE_string("prompt", "a picture of", "Text prefix for the encoder.")
  flags.DEFINE_integer("beam_size", 1, "1: greedy; > 1: beam search.")
  flags.DEFINE_integer("max_decode_length", 32, "Most tokens to generate.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_integer("batch_size", 8, "Images decoded together.")
  flags.DEFINE_enum("format", "text", ["text", "json"], "Output format.")


def main(argv):
  del argv
  distributed.initialize()
  run_main(_predict)


def _predict():
  f = flags.FLAGS
  predictor = Predictor(f.checkpoint_dir, f.step)
  if f.image2:
    raise UserError(f"--image2 needs a two-image (NLVR2) model; {f.checkpoint_dir} is not one")
  paths = expand_images(f.image)
  for start in range(0, len(paths), f.batch_size):
    chunk = paths[start:start + f.batch_size]
    images = np.stack([load_image(p, predictor.config.image_size) for p in chunk])
    for path, result in zip(chunk, predictor.generate(images, [f.prompt] * len(chunk),
                                                      f.beam_size, f.max_decode_length)):
      if f.format == "json":
        print(json.dumps({"image": path, "prompt": f.prompt, **result}), flush=True)
      else:
        print(f"{path}\t{result['prediction']}", flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
