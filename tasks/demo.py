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
import functools
import json
import os
import sys
import time
from typing import Optional, Sequence

import gin
import jax
import numpy as np

from simvlm_jax import console, gin_utils
import tasks
from tasks import build, shapes_caption_check, shapes_world

PROMPT = "a picture of"  # SimVLM's "A picture of"; the shapes vocabulary is lower case.


def run_train(gin_files: Sequence[str], model_dir: str, bindings: Sequence[str] = ()) -> None:
  """One training run in this process (`python -m simvlm_jax.train` with these files/bindings).

  A run stopped by SIGTERM/SIGINT has saved the step it reached: the whole program then ends
  (exit status 0) instead of going on to evaluate a half-trained model; the same command resumes.
  """
  from simvlm_jax import train
  gin.clear_config()
  gin_utils.parse_gin(list(gin_files), [f"train.model_dir = '{model_dir}'", *bindings])
  total = gin.query_parameter("train.total_steps")
  reached = int(jax.device_get(train.train().step))
  if reached < total:
    print(f"stopped at step {reached} of {total} ({model_dir}); run the same command to resume",
          flush=True)
    sys.exit(0)


def _held_out_accuracy(model_dir: str, splits: Sequence[str], with_images: bool) -> list[float]:
  """Teacher-forced PrefixLM token accuracy on held-out captions, per split (the config of
  `model_dir`; one Trainer, so its eval step compiles once for every split)."""
  from simvlm_jax import run_dir
  from simvlm_jax.data import pipeline
  from simvlm_jax.partitioning import Partitioner
  from simvlm_jax.evaluators import teacher_forced
  from simvlm_jax.trainer import Trainer
  run = run_dir.open_run(model_dir)
  # One device, where open_run put the parameters; the Trainer only lends its eval step.
  trainer = Trainer(run.config, Partitioner((1, 1, 1), devices=jax.devices()[:1]), total_steps=1)
  params = run.params

  def batches(split: str, shard_index: int, num_shards: int):
    it = pipeline.make_eval_iterator("shapes64_image_text", split=split, image_text_batch_size=64,
                                     text_batch_size=0, text_length=8, shard_index=shard_index,
                                     num_shards=num_shards)
    for batch in it:
      if not with_images:  # the text-only model reads the captions without their images
        batch["image_text"].pop("images")
      yield batch
  return [teacher_forced.run(trainer, params, functools.partial(batches, split),
                             max_batches=10**9)["eval/accuracy"] for split in splits]


def _show_captions(model_dir: str, data_dir: str, count: int = 8) -> dict:
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
          f"{checked.named_objects}/{checked.objects} objects named, "
          f"{'right' if checked.right_about_colour_and_shape else 'wrong'} about colour and shape")
    captions.append(caption)
    scenes.append(scene)
  total = shapes_caption_check.corpus_score(captions, scenes)
  print(f"\ncaption correctness on {total['captions']} held-out images: "
        f"{shapes_caption_check.summary(total)}")
  return total


# (benchmark, recipe, task, metric shown)
DOWNSTREAM = (("VQA", "vqa", "shapes_vqa_v2", "accuracy"),
              ("NLVR2", "nlvr2", "shapes_nlvr2", "accuracy"),
              ("SNLI-VE", "snli_ve", "shapes_snli_ve", "accuracy"),
              ("captioning", "coco_caption", "shapes_coco_captions", "CIDEr"))
CAPTION_METRICS = ("Bleu", "ROUGE_L", "CIDEr")  # METEOR's Java start-up is skipped in the demo


def run_finetune(recipe: str, task: str, model_dir: str, pretrained: Optional[str], steps: int,
                 extra_gin_files: Sequence[str] = (), bindings: Sequence[str] = ()) -> None:
  """Finetunes SimVLM-Tiny (pretrained=None: from scratch) with `gin/finetune/<recipe>.gin` and
  the demo's finetuning run file, then `extra_gin_files` (e.g. the pretraining run's ablation:
  the architecture must match the checkpoint)."""
  run_train(["models/simvlm_tiny.gin", f"finetune/{recipe}.gin", "runs/demo_finetune.gin",
             *extra_gin_files], model_dir,
            [f"TASK = '{task}'", f"PRETRAINED_DIR = {pretrained!r}",
             f"train.total_steps = {steps}", f"train.log_every = {max(steps // 4, 1)}",
             *bindings])


def evaluate(model_dir: str, task: str, max_examples: int) -> dict:
  """The scores (`simvlm_jax.eval`) of the last checkpoint of `model_dir` on `task` (validation);
  an earlier finished evaluation is read back."""
  from simvlm_jax import eval as eval_lib
  output_dir = os.path.join(model_dir, f"eval_{task}")
  if os.path.exists(os.path.join(output_dir, "scores.json")):  # a finished earlier demo
    with open(os.path.join(output_dir, "scores.json")) as f:
      scores = json.load(f)
    return scores[max(scores, key=int)]
  results = eval_lib.evaluate(model_dir=model_dir, task=task, split="validation",
                              output_dir=output_dir, batch_size=64, method="auto",
                              max_examples=max_examples, caption_metric_names=CAPTION_METRICS,
                              report_examples=50, steps="latest")
  return results[max(results)]


def headline(task: str, scores: dict) -> float:
  """VQA accuracy, CIDEr (x100, as the paper prints it) or accuracy."""
  from simvlm_jax import evaluators
  return evaluators.headline(evaluators.benchmark_of(task), scores)[1]


def _finished(model_dir: str, steps: int) -> bool:
  return os.path.isdir(os.path.join(model_dir, "checkpoints", str(steps)))


def _correctness(scores: dict) -> str:
  checked = scores.get("caption_correctness")
  return f"   correctness: {shapes_caption_check.summary(checked)}" if checked else ""


def build_downstream(workdir: str, data_dir: str, train: int, evaluation: int) -> None:
  """The shapes world's downstream benchmarks (raw files in <workdir>/downstream_raw, TFDS)."""
  build.main(["--data_dir", data_dir, "shapes_downstream", "--out_dir",
              os.path.join(workdir, "downstream_raw"), "--train", str(train),
              "--eval", str(evaluation), "--workers", "0"])  # no fork(): JAX may be running


def finetune_steps(default: int, overrides: Sequence[str] = ()) -> dict[str, int]:
  """Finetuning steps per benchmark: `default`, but "NAME=STEPS" for those `overrides` name
  ("VQA=1000"); the text-only NLI run ("text NLI") trains as long as SNLI-VE, its test."""
  steps = {name: default for name, *_ in DOWNSTREAM}
  for item in overrides:
    name, _, value = item.partition("=")
    if name not in steps or not value.isdigit() or int(value) < 1:
      raise SystemExit(f"--finetune_steps_for {item!r}: expected NAME=STEPS with NAME one of "
                       f"{', '.join(steps)} and STEPS a positive number")
    steps[name] = int(value)
  return {**steps, "text NLI": steps["SNLI-VE"]}


def _downstream(args, workdir: str, data_dir: str, pretrained: str) -> tuple[dict, dict]:
  """Finetunes and evaluates; returns {row: scores} (rows "VQA/pretrained", "zero-shot", ...)
  and the finetuning steps of each benchmark."""
  steps_of = finetune_steps(args.finetune_steps or (args.steps if args.steps is not None else 80),
                            args.finetune_steps_for)
  build_downstream(workdir, data_dir, min(args.downstream_train, args.train_images),
                   min(args.downstream_eval, args.heldout_images))
  root = os.path.join(workdir, "downstream")
  max_examples = args.downstream_eval_examples
  scores = {}
  chosen = [row for row in DOWNSTREAM if row[0] in args.downstream]
  runs = [(name, recipe, task, start) for name, recipe, task, _ in chosen
          for start in ("pretrained", "scratch")]
  if "SNLI-VE" in args.downstream:  # and the cross-modality transfer experiment
    runs.append(("text NLI", "snli_ve_text", "shapes_snli_ve_text", "pretrained"))
  for name, recipe, task, start in runs:
    model_dir = os.path.join(root, f"{recipe}_{start}")
    steps = steps_of[name]
    print(f"-- finetuning ({start}) on {task} for {steps} steps -> {model_dir}", flush=True)
    if not _finished(model_dir, steps):
      run_finetune(recipe, task, model_dir, pretrained if start == "pretrained" else None, steps,
                   bindings=args.finetune_gin)
    eval_task = "shapes_snli_ve" if recipe == "snli_ve_text" else task
    scores[f"{name}/{start}"] = evaluate(model_dir, eval_task, max_examples)
  if "captioning" in args.downstream:
    print("-- zero-shot captioning with the pretrained model (prompt \"a picture of\")",
          flush=True)
    scores["zero-shot captioning"] = evaluate(pretrained, "shapes_coco_captions", max_examples)

  print(f"\ndownstream (shapes world, validation, first {max_examples} examples):")
  print(f"  {'benchmark':<12} {'metric':<9} {'pretrained':>10} {'from scratch':>13} {'steps':>7}")
  for name, _, task, metric in chosen:
    row = [headline(task, scores[f"{name}/{start}"]) for start in ("pretrained", "scratch")]
    print(f"  {name:<12} {metric:<9} {row[0]:>10.2f} {row[1]:>13.2f} {steps_of[name]:>7}")
  if "captioning" in args.downstream:
    for start in ("pretrained", "scratch"):
      print(f"  captioning ({start}){_correctness(scores[f'captioning/{start}'])}")
    zero_shot = scores["zero-shot captioning"]
    print("  zero-shot:")
    print(f"  {'captioning':<12} {'CIDEr':<9} "
          f"{headline('shapes_coco_captions', zero_shot):>10.2f}   (pretrained model, no "
          f"finetuning, prompt \"{PROMPT}\")\n  {'':<33}{_correctness(zero_shot)}")
  if "SNLI-VE" in args.downstream:
    print(f"  {'SNLI-VE':<12} {'accuracy':<9} "
          f"{headline('shapes_snli_ve', scores['text NLI/pretrained']):>10.2f}   "
          "(finetuned on text-only NLI, tested with images)")
  print(f"  reports: {root}/*/eval_*/report_<step>.html")
  return scores, steps_of


def main(argv=None) -> dict:
  """Runs the demo; returns what it printed as numbers (`benchmarks/fidelity.py` keeps them)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default=os.path.abspath("demo_output"))
  parser.add_argument("--pretrain_gin", default="runs/demo_pretrain.gin",
                      help="the pretraining run file (gin/)")
  parser.add_argument("--gin", action="append", default=[],
                      help="a gin binding for the pretraining run (repeatable)")
  parser.add_argument("--finetune_gin", action="append", default=[],
                      help="a gin binding for every finetuning run (repeatable)")
  parser.add_argument("--steps", type=int, default=None, help="default: the gin file's")
  parser.add_argument("--train_images", type=int, default=20000)
  parser.add_argument("--heldout_images", type=int, default=1000, help="per held-out split")
  parser.add_argument("--text_statements", type=int, default=50000)
  parser.add_argument("--finetune_steps", type=int, default=None,
                      help="steps of each finetuning run (default: --steps if given, else 80)")
  parser.add_argument("--finetune_steps_for", action="append", default=[], metavar="NAME=STEPS",
                      help="another number of finetuning steps for one benchmark, e.g. VQA=1000 "
                           "(repeatable; the text-only NLI run follows SNLI-VE's)")
  parser.add_argument("--downstream_train", type=int, default=2000,
                      help="training images per downstream benchmark (at most --train_images)")
  parser.add_argument("--downstream_eval", type=int, default=200,
                      help="images per downstream eval split (at most --heldout_images)")
  parser.add_argument("--downstream_eval_examples", type=int, default=300,
                      help="examples scored per downstream evaluation")
  parser.add_argument("--downstream", nargs="+", choices=[row[0] for row in DOWNSTREAM],
                      default=[row[0] for row in DOWNSTREAM],
                      help="benchmarks to finetune on (captioning adds zero-shot captioning; "
                           "SNLI-VE adds text-only NLI transfer)")
  parser.add_argument("--skip_text_only", action="store_true",
                      help="no text-only comparison model (step 3)")
  parser.add_argument("--skip_downstream", action="store_true")
  parser.add_argument(console.FLAG, action="store_true",
                      help="show the libraries' logging (see simvlm_jax.console)")
  args = parser.parse_args(argv)
  start = time.time()
  data_dir = os.path.join(args.workdir, "tfds")
  os.environ["SIMVLM_DATA_DIR"] = data_dir
  tasks.register_defaults(data_dir)  # `import tasks` registered them over the default directory
  console.quiet_python()

  print("== 1/5 building the shapes world", flush=True)
  heldout = str(args.heldout_images)
  build.main(["--data_dir", data_dir, "shapes", "--train", str(args.train_images),
              "--validation", heldout, "--compositional", heldout,
              "--text_train", str(args.text_statements), "--text_validation", heldout])
  bindings = args.gin + ([] if args.steps is None else [f"train.total_steps = {args.steps}"])
  runs = {"image-text + text": os.path.join(args.workdir, "pretrain")}
  if not args.skip_text_only:
    runs["text only"] = os.path.join(args.workdir, "text_only")
  print(f"== 2/5 pretraining SimVLM-Tiny on image-text + text ({runs['image-text + text']})",
        flush=True)
  run_train([args.pretrain_gin], runs["image-text + text"], bindings)
  if not args.skip_text_only:
    print(f"== 3/5 the same model on text only ({runs['text only']})", flush=True)
    run_train([args.pretrain_gin], runs["text only"],
              bindings + ["IMAGE_TEXT_BATCH_SIZE = 0", "train.eval_iterator_fn = None"])

  print("== 4/5 held-out captions", flush=True)
  results = {"held-out captions": _show_captions(runs["image-text + text"], data_dir),
             "held-out token accuracy": {}}
  print("\nheld-out teacher-forced token accuracy on captions (PrefixLM split):")
  print(f"  {'model':<20} {'validation':>10} {'compositional':>14}")
  for name, model_dir in runs.items():
    with_images = name != "text only"
    accs = _held_out_accuracy(model_dir, ("validation", "compositional"), with_images)
    results["held-out token accuracy"][name] = dict(zip(("validation", "compositional"), accs))
    print(f"  {name:<20} {accs[0]:>10.3f} {accs[1]:>14.3f}")
  if not args.skip_downstream:
    print("\n== 5/5 downstream: finetuning and evaluating on the shapes world's benchmarks",
          flush=True)
    results["downstream"], results["finetune steps"] = _downstream(
        args, args.workdir, data_dir, runs["image-text + text"])
  results["minutes"] = (time.time() - start) / 60
  print(f"\ndemo finished in {results['minutes']:.1f} min; predict on your own images with\n"
        f"  .venv/bin/python -m simvlm_jax.predict --checkpoint_dir={runs['image-text + text']} "
        f"--image='path/*.png'")
  return results


if __name__ == "__main__":
  main()
