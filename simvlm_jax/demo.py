r"""The embedded CPU demo (what `make demo` runs): SimVLM from scratch on the shapes world.

  1. builds the shapes-world data and its SentencePiece vocabulary (`python -m tasks.build`);
  2. pretrains SimVLM-Tiny with PrefixLM on the image-text + text-only mixture
     (`gin/runs/demo_pretrain.gin`), with checkpoints;
  3. trains the same model for the same steps on the text-only stream alone;
  4. prints, for 8 held-out images, the reference captions next to the model's greedy
     continuation of the prompt "a picture of", and the held-out teacher-forced token accuracy of
     both models on the captions of the validation and compositional (unseen colour-shape pairs)
     splits.

Everything lands in --workdir; running again reuses what is there (data, finished runs).
"""
import argparse
import importlib
import os
import time

import gin
import jax
import numpy as np

from simvlm_jax import gin_utils

PROMPT = "a picture of"  # SimVLM's "A picture of"; the shapes vocabulary is lower case.


def _run_train(gin_file: str, model_dir: str, bindings) -> None:
  from simvlm_jax import train
  gin.clear_config()
  gin_utils.parse_gin([gin_file], [f"train.model_dir = '{model_dir}'", *bindings])
  train.train()


def _held_out_accuracy(model_dir: str, split: str, with_images: bool) -> float:
  """Teacher-forced PrefixLM token accuracy on held-out captions (the config of `model_dir`)."""
  from simvlm_jax import checkpoints
  from simvlm_jax.data import pipeline
  from simvlm_jax.models import ModelConfig
  from simvlm_jax.partitioning import Partitioner
  from simvlm_jax.train import evaluate
  from simvlm_jax.trainer import Trainer
  gin.clear_config()
  gin_utils.parse_gin([os.path.join(model_dir, "config.gin")], [])
  trainer = Trainer(ModelConfig(), Partitioner((-1, 1, 1)), total_steps=1)
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"))
  params = ckpt.restore(trainer.abstract_state).params
  ckpt.close()

  def batches():
    it = pipeline.make_eval_iterator("shapes64_image_text", split=split, image_text_batch_size=64,
                                     text_batch_size=0, text_length=8)
    for batch in it:
      if not with_images:  # the text-only model reads the captions without their images
        batch["image_text"].pop("images")
      yield batch
  return evaluate(trainer, params, batches, max_batches=10**9)["eval/accuracy"]


def _show_captions(model_dir: str, data_dir: str, count: int = 8) -> None:
  """Reference captions vs the greedy continuation of PROMPT, for held-out images."""
  import tensorflow_datasets as tfds
  from simvlm_jax.predict import Predictor
  from simvlm_jax.data import image_ops
  predictor = Predictor(model_dir)
  examples = list(tfds.load("shapes_world/64px", split=f"validation[:{count}]",
                            data_dir=data_dir, decoders={"image": tfds.decode.SkipDecoding()}))
  size = predictor.config.image_size
  images = np.stack([image_ops.crop_and_resize(image_ops.decode_rgb(ex["image"]),
                                               (size, size)).numpy() for ex in examples])
  results = predictor.generate(images, [PROMPT] * len(examples))
  for i, (ex, result) in enumerate(zip(examples, results)):
    print(f"\nheld-out image {i}:")
    for ref in ex["captions"].numpy():
      print(f"  reference : {ref.decode()}")
    print(f"  model     : {PROMPT} {result['prediction']}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default=os.path.abspath("demo_output"))
  parser.add_argument("--steps", type=int, default=None, help="default: the gin file's")
  parser.add_argument("--train_images", type=int, default=20000)
  parser.add_argument("--heldout_images", type=int, default=1000, help="per held-out split")
  parser.add_argument("--text_statements", type=int, default=50000)
  args = parser.parse_args(argv)
  start = time.time()
  data_dir = os.path.join(args.workdir, "tfds")
  os.environ["SIMVLM_DATA_DIR"] = data_dir
  gin_utils.quiet_logging()
  importlib.import_module("tasks")
  from tasks import build

  print("== 1/4 building the shapes world", flush=True)
  heldout = str(args.heldout_images)
  build.main(["--data_dir", data_dir, "shapes", "--train", str(args.train_images),
              "--validation", heldout, "--compositional", heldout,
              "--text_train", str(args.text_statements), "--text_validation", heldout])
  gin_file = "runs/demo_pretrain.gin"
  steps = [] if args.steps is None else [f"train.total_steps = {args.steps}"]
  runs = {"image-text + text": os.path.join(args.workdir, "pretrain"),
          "text only": os.path.join(args.workdir, "text_only")}
  print(f"== 2/4 pretraining SimVLM-Tiny on image-text + text ({runs['image-text + text']})",
        flush=True)
  _run_train(gin_file, runs["image-text + text"], steps)
  print(f"== 3/4 the same model on text only ({runs['text only']})", flush=True)
  _run_train(gin_file, runs["text only"],
             steps + ["IMAGE_TEXT_BATCH_SIZE = 0", "train.eval_iterator_fn = None"])

  print("== 4/4 held-out captions", flush=True)
  _show_captions(runs["image-text + text"], data_dir)
  print("\nheld-out teacher-forced token accuracy on captions (PrefixLM split):")
  print(f"  {'model':<20} {'validation':>10} {'compositional':>14}")
  for name, model_dir in runs.items():
    with_images = name != "text only"
    accs = [_held_out_accuracy(model_dir, split, with_images)
            for split in ("validation", "compositional")]
    print(f"  {name:<20} {accs[0]:>10.3f} {accs[1]:>14.3f}")
  print(f"\ndemo finished in {(time.time() - start) / 60:.1f} min; predict on your own images with\n"
        f"  .venv/bin/python -m simvlm_jax.predict --checkpoint_dir={runs['image-text + text']} "
        f"--image='path/*.png'")


if __name__ == "__main__":
  main()
