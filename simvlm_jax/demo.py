r"""The embedded CPU demo (what `make demo` runs): SimVLM from scratch on the shapes world.

  1. builds the shapes-world data and its SentencePiece vocabulary (`python -m tasks.build`);
  2. pretrains SimVLM-Tiny with PrefixLM on the image-text + text-only mixture
     (`gin/runs/demo_pretrain.gin`), with checkpoints;
  3. trains the same model for the same steps on the text-only stream alone;
  4. prints, for 8 held-out images, the reference captions next to the model's greedy
     continuation of the prompt "a picture of", and the held-out teacher-forced token accuracy of
     both models on the captions of the validation and compositional (unseen colour-shape pairs)
     splits;
  5. builds the shapes world's downstream benchmarks, finetunes the pretrained model on VQA, NLVR2,
     SNLI-VE and captioning (`gin/finetune/*.gin` + `gin/runs/demo_finetune.gin`), and the same
     model from scratch (no pretraining); also finetunes on text-only NLI and tests on SNLI-VE
     with images (cross-modality transfer), and captions zero-shot with the pretrained model
     (prompt "a picture of"); evaluates everything with the official metrics
     (`simvlm_jax.eval`) and prints a table.

Everything lands in --workdir; running again reuses what is there (data, finished runs).
"""
import argparse
import importlib
import os
import time

import gin
import jax
import numpy as np

from simvlm_jax import console, gin_utils

PROMPT = "a picture of"  # SimVLM's "A picture of"; the shapes vocabulary is lower case.


def _run_train(gin_file: str, model_dir: str, bindings) -> None:
  from simvlm_jax import train
  gin.clear_config()
  gin_utils.parse_gin([gin_file], [f"train.model_dir = '{model_dir}'", *bindings])
  train.train()


def _held_out_accuracy(model_dir: str, split: str, with_images: bool) -> float:
  """Teacher-forced PrefixLM token accuracy on held-out captions (the config of `model_dir`)."""
  from simvlm_jax import run_dir
  from simvlm_jax.data import pipeline
  from simvlm_jax.partitioning import Partitioner
  from simvlm_jax.train import evaluate
  from simvlm_jax.trainer import Trainer
  run = run_dir.open_run(model_dir)
  # One device, where open_run put the parameters; the Trainer only lends its eval step.
  trainer = Trainer(run.config, Partitioner((1, 1, 1), devices=jax.devices()[:1]), total_steps=1)
  params = run.params

  def batches(shard_index: int, num_shards: int):
    it = pipeline.make_eval_iterator("shapes64_image_text", split=split, image_text_batch_size=64,
                                     text_batch_size=0, text_length=8, shard_index=shard_index,
                                     num_shards=num_shards)
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
  from tasks import shapes_caption_check, shapes_world
  names = {"colour": list(shapes_world.COLOURS), "shape": list(shapes_world.SHAPES),
           "size": list(shapes_world.SIZES)}  # the ClassLabel names, in order
  results = predictor.generate(images, [PROMPT] * len(examples))
  captions, scenes = [], []
  for i, (ex, result) in enumerate(zip(examples, results)):
    print(f"\nheld-out image {i}:")
    for ref in ex["captions"].numpy():
      print(f"  reference : {ref.decode()}")
    caption = f"{PROMPT} {result['prediction']}"
    scene = {k: [names[k][label] for label in ex["objects"][k].numpy()] for k in names}
    checked = shapes_caption_check.score(caption, scene)
    print(f"  model     : {caption}")
    print(f"  checked   : {checked.true_claims}/{checked.claims} claims true, "
          f"{checked.named_objects}/{checked.objects} objects named")
    captions.append(caption)
    scenes.append(scene)
  total = shapes_caption_check.corpus_score(captions, scenes)
  print(f"\ncaption correctness on {total['captions']} held-out images: {total['precision']:.0f}% "
        f"of the colours, shapes, sizes and counts stated are true; {total['recall']:.0f}% of the "
        "objects are named")


# (benchmark, recipe, task, metric shown)
DOWNSTREAM = (("VQA", "vqa", "shapes_vqa_v2", "accuracy"),
              ("NLVR2", "nlvr2", "shapes_nlvr2", "accuracy"),
              ("SNLI-VE", "snli_ve", "shapes_snli_ve", "accuracy"),
              ("captioning", "coco_caption", "shapes_coco_captions", "CIDEr"))
CAPTION_METRICS = ("Bleu", "ROUGE_L", "CIDEr")  # METEOR's Java start-up is skipped in the demo


def _run_finetune(recipe: str, task: str, model_dir: str, pretrained, steps: int) -> None:
  from simvlm_jax import train
  gin.clear_config()
  gin_utils.parse_gin(["models/simvlm_tiny.gin", f"finetune/{recipe}.gin",
                       "runs/demo_finetune.gin"],
                      [f"train.model_dir = '{model_dir}'", f"TASK = '{task}'",
                       f"PRETRAINED_DIR = {pretrained!r}", f"train.total_steps = {steps}",
                       f"train.log_every = {max(steps // 2, 1)}"])
  train.train()


def _evaluate(model_dir: str, task: str, max_examples: int) -> float:
  """The headline score of the last checkpoint of `model_dir` on `task` (validation)."""
  from simvlm_jax import eval as eval_lib
  output_dir = os.path.join(model_dir, f"eval_{task}")
  if os.path.exists(os.path.join(output_dir, "scores.json")):  # a finished earlier demo
    import json
    with open(os.path.join(output_dir, "scores.json")) as f:
      scores = json.load(f)
    last = scores[max(scores, key=int)]
  else:
    results = eval_lib.evaluate(model_dir=model_dir, task=task, split="validation",
                                output_dir=output_dir, batch_size=64, method="auto",
                                max_examples=max_examples, caption_metric_names=CAPTION_METRICS,
                                report_examples=50, steps="latest")
    last = results[max(results)]
  return eval_lib.headline(eval_lib.benchmark_of(task), last)[1]


def _finished(model_dir: str, steps: int) -> bool:
  return os.path.isdir(os.path.join(model_dir, "checkpoints", str(steps)))


def _downstream(args, workdir: str, data_dir: str, pretrained: str) -> None:
  from tasks import build
  steps = args.finetune_steps or (args.steps if args.steps is not None else 80)
  train_images = min(args.downstream_train, args.train_images)
  eval_images = min(args.downstream_eval, args.heldout_images)
  build.main(["--data_dir", data_dir, "shapes_downstream", "--out_dir",
              os.path.join(workdir, "downstream_raw"), "--train", str(train_images),
              "--eval", str(eval_images), "--workers", "0"])  # no fork(): JAX is running
  root = os.path.join(workdir, "downstream")
  max_examples = args.downstream_eval_examples
  scores = {}
  runs = [(name, recipe, task, start) for name, recipe, task, _ in DOWNSTREAM
          for start in ("pretrained", "scratch")]
  runs.append(("text NLI", "snli_ve_text", "shapes_snli_ve_text", "pretrained"))
  for name, recipe, task, start in runs:
    model_dir = os.path.join(root, f"{recipe}_{start}")
    print(f"-- finetuning ({start}) on {task} for {steps} steps -> {model_dir}", flush=True)
    if not _finished(model_dir, steps):
      _run_finetune(recipe, task, model_dir, pretrained if start == "pretrained" else None, steps)
    eval_task = "shapes_snli_ve" if recipe == "snli_ve_text" else task
    scores[(name, start)] = _evaluate(model_dir, eval_task, max_examples)
  print("-- zero-shot captioning with the pretrained model (prompt \"a picture of\")", flush=True)
  zero_shot = _evaluate(pretrained, "shapes_coco_captions", max_examples)

  print(f"\ndownstream (shapes world, validation, first {max_examples} examples; "
        f"{steps} finetuning steps each):")
  print(f"  {'benchmark':<12} {'metric':<9} {'pretrained':>10} {'from scratch':>13}")
  for name, _, _, metric in DOWNSTREAM:
    print(f"  {name:<12} {metric:<9} {scores[(name, 'pretrained')]:>10.2f} "
          f"{scores[(name, 'scratch')]:>13.2f}")
  print("  zero-shot:")
  print(f"  {'captioning':<12} {'CIDEr':<9} {zero_shot:>10.2f}   (pretrained model, no "
        f"finetuning, prompt \"{PROMPT}\")")
  print(f"  {'SNLI-VE':<12} {'accuracy':<9} {scores[('text NLI', 'pretrained')]:>10.2f}   "
        "(finetuned on text-only NLI, tested with images)")
  print(f"  reports: {root}/*/eval_*/report_<step>.html")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default=os.path.abspath("demo_output"))
  parser.add_argument("--steps", type=int, default=None, help="default: the gin file's")
  parser.add_argument("--train_images", type=int, default=20000)
  parser.add_argument("--heldout_images", type=int, default=1000, help="per held-out split")
  parser.add_argument("--text_statements", type=int, default=50000)
  parser.add_argument("--finetune_steps", type=int, default=None,
                      help="steps of each finetuning run (default: --steps if given, else 80)")
  parser.add_argument("--downstream_train", type=int, default=2000,
                      help="training images per downstream benchmark (at most --train_images)")
  parser.add_argument("--downstream_eval", type=int, default=200,
                      help="images per downstream eval split (at most --heldout_images)")
  parser.add_argument("--downstream_eval_examples", type=int, default=300,
                      help="examples scored per downstream evaluation")
  parser.add_argument("--skip_downstream", action="store_true")
  parser.add_argument(console.FLAG, action="store_true",
                      help="show the libraries' logging (see simvlm_jax.console)")
  args = parser.parse_args(argv)
  start = time.time()
  data_dir = os.path.join(args.workdir, "tfds")
  os.environ["SIMVLM_DATA_DIR"] = data_dir
  console.quiet_python()
  importlib.import_module("tasks")
  from tasks import build

  print("== 1/5 building the shapes world", flush=True)
  heldout = str(args.heldout_images)
  build.main(["--data_dir", data_dir, "shapes", "--train", str(args.train_images),
              "--validation", heldout, "--compositional", heldout,
              "--text_train", str(args.text_statements), "--text_validation", heldout])
  gin_file = "runs/demo_pretrain.gin"
  steps = [] if args.steps is None else [f"train.total_steps = {args.steps}"]
  runs = {"image-text + text": os.path.join(args.workdir, "pretrain"),
          "text only": os.path.join(args.workdir, "text_only")}
  print(f"== 2/5 pretraining SimVLM-Tiny on image-text + text ({runs['image-text + text']})",
        flush=True)
  _run_train(gin_file, runs["image-text + text"], steps)
  print(f"== 3/5 the same model on text only ({runs['text only']})", flush=True)
  _run_train(gin_file, runs["text only"],
             steps + ["IMAGE_TEXT_BATCH_SIZE = 0", "train.eval_iterator_fn = None"])

  print("== 4/5 held-out captions", flush=True)
  _show_captions(runs["image-text + text"], data_dir)
  print("\nheld-out teacher-forced token accuracy on captions (PrefixLM split):")
  print(f"  {'model':<20} {'validation':>10} {'compositional':>14}")
  for name, model_dir in runs.items():
    with_images = name != "text only"
    accs = [_held_out_accuracy(model_dir, split, with_images)
            for split in ("validation", "compositional")]
    print(f"  {name:<20} {accs[0]:>10.3f} {accs[1]:>14.3f}")
  if not args.skip_downstream:
    print("\n== 5/5 downstream: finetuning and evaluating on the shapes world's benchmarks",
          flush=True)
    _downstream(args, args.workdir, data_dir, runs["image-text + text"])
  print(f"\ndemo finished in {(time.time() - start) / 60:.1f} min; predict on your own images with\n"
        f"  .venv/bin/python -m simvlm_jax.predict --checkpoint_dir={runs['image-text + text']} "
        f"--image='path/*.png'")


if __name__ == "__main__":
  main()
