r"""SimVLM's ablations (its Table 6) on the shapes world, at equal compute, over several seeds.

  .venv/bin/python benchmarks/ablations.py [--workdir ablations_output] [--seeds 0 1]
      [--configs prefix_lm span_corruption ...] [--pretrain_steps 1500] [--finetune_steps 200]

Every row pretrains SimVLM-Tiny with the demo's run (`gin/runs/demo_pretrain.gin`: same steps,
batch, schedule) plus the row's gin files from `gin/ablations/`, then measures:
  zero-shot captioning   CIDEr and caption correctness (% of claims true, % of objects named, % of
                         captions right about colour and shape; `tasks.shapes_caption_check`) of
                         the pretrained model, prompt "a picture of"
  VQA                    VQA accuracy after finetuning on shapes VQA
  text NLI -> SNLI-VE    accuracy on SNLI-VE (with images) after finetuning on text-only NLI
                         (the cross-modality transfer experiment)
Each row runs once per seed (`train.seed` and the data stream's seed); the table shows the mean and
the spread (max - min) over seeds. Finished runs and evaluations are reused, so an interrupted table
resumes. Results: <workdir>/results.json (every run) and the printed markdown table.
"""
import argparse
import json
import os
import statistics
import sys
import time

# (row, gin files over the base run). The ablation gin files also go into the row's finetuning
# runs, which must build the pretrained architecture (and vocabulary) to load it.
CONFIGS = {
    "prefix_lm": (),
    "span_corruption": ("ablations/span_corruption.gin",),
    "plain_lm": ("ablations/plain_lm.gin",),
    "decoder_only": ("ablations/decoder_only.gin",),
    "linear_patches": ("ablations/linear_patches.gin",),
    "image_text_only": ("ablations/image_text_only.gin",),
}
BASE = "runs/demo_pretrain.gin"
# (column, how it is read from a run's results)
COLUMNS = (("zero-shot CIDEr", lambda r: r["zero_shot"]["CIDEr"] * 100),
           ("claims true %", lambda r: r["zero_shot"]["caption_correctness"]["precision"]),
           ("objects named %", lambda r: r["zero_shot"]["caption_correctness"]["recall"]),
           ("right about colour and shape %",
            lambda r: r["zero_shot"]["caption_correctness"].get("right")),
           ("VQA", lambda r: r["vqa"]["accuracy"]),
           ("text NLI -> SNLI-VE", lambda r: r["text_nli"]["accuracy"]))


def run_one(config: str, seed: int, args, workdir: str) -> dict:
  from tasks import demo
  files = CONFIGS[config]
  root = os.path.join(workdir, f"{config}_seed{seed}")
  pretrain = os.path.join(root, "pretrain")
  seeds = [f"train.seed = {seed}", f"make_pretrain_iterator.seed = {seed}"]
  start = time.time()
  if not os.path.isdir(os.path.join(pretrain, "checkpoints", str(args.pretrain_steps))):
    demo.run_train([BASE, *files], pretrain,
                   [*seeds, f"train.total_steps = {args.pretrain_steps}",
                    f"train.checkpoint_every = {args.pretrain_steps}"])
  pretrain_minutes = (time.time() - start) / 60
  result = {"config": config, "seed": seed, "pretrain_minutes": pretrain_minutes,
            "zero_shot": demo.evaluate(pretrain, "shapes_coco_captions", args.eval_examples)}
  for key, recipe, task, eval_task in (("vqa", "vqa", "shapes_vqa_v2", "shapes_vqa_v2"),
                                       ("text_nli", "snli_ve_text", "shapes_snli_ve_text",
                                        "shapes_snli_ve")):
    model_dir = os.path.join(root, recipe)
    if not os.path.isdir(os.path.join(model_dir, "checkpoints", str(args.finetune_steps))):
      demo.run_finetune(recipe, task, model_dir, pretrain, args.finetune_steps,
                        extra_gin_files=files, bindings=[f"train.seed = {seed}"])
    result[key] = demo.evaluate(model_dir, eval_task, args.eval_examples)
  result["minutes"] = (time.time() - start) / 60
  return result


def table(results: list[dict]) -> str:
  """Markdown: per config, mean and spread (max - min) over its seeds of every column."""
  lines = ["| pretraining | seeds | " + " | ".join(c for c, _ in COLUMNS) + " |",
           "| --- | --- |" + " --- |" * len(COLUMNS)]
  for config in CONFIGS:
    runs = [r for r in results if r["config"] == config]
    if not runs:
      continue
    cells = []
    for _, read in COLUMNS:
      values = [read(r) for r in runs]
      if None in values:  # no claims (no precision), or a column added after the run
        cells.append("n/a")
        continue
      cells.append(f"{statistics.mean(values):.1f} ± {(max(values) - min(values)) / 2:.1f}")
    seeds = ",".join(str(r["seed"]) for r in runs)
    lines.append(f"| {config} | {seeds} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default=os.path.abspath("ablations_output"))
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
  parser.add_argument("--pretrain_steps", type=int, default=1500, help="the demo run's")
  parser.add_argument("--finetune_steps", type=int, default=200)
  parser.add_argument("--eval_examples", type=int, default=300)
  parser.add_argument("--train_images", type=int, default=20000, help="as the demo's")
  parser.add_argument("--downstream_train", type=int, default=2000, help="as the demo's")
  parser.add_argument("--downstream_eval", type=int, default=200, help="as the demo's")
  args = parser.parse_args(argv)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from simvlm_jax import console
  console.quiet_native()  # a script, not `python -m`: silence the libraries' C++ logging here
  console.quiet_python()
  from tasks import demo
  os.environ["SIMVLM_DATA_DIR"] = data_dir = os.path.join(args.workdir, "tfds")
  from tasks import build
  build.main(["--data_dir", data_dir, "shapes", "--train", str(args.train_images),
              "--validation", "1000", "--compositional", "1000", "--text_train", "50000",
              "--text_validation", "1000"])  # the demo's data
  demo.build_downstream(args.workdir, data_dir, args.downstream_train, args.downstream_eval)

  results_path = os.path.join(args.workdir, "results.json")
  results = json.load(open(results_path)) if os.path.exists(results_path) else []
  done = {(r["config"], r["seed"]) for r in results}
  for seed in args.seeds:  # seeds outermost: an interrupted table has every row once first
    for config in args.configs:
      if (config, seed) in done:
        continue
      print(f"== {config}, seed {seed}", flush=True)
      results.append(run_one(config, seed, args, args.workdir))
      with open(results_path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
      os.replace(results_path + ".tmp", results_path)
      print(table(results), flush=True)
  print(f"\nablations ({args.pretrain_steps} pretraining steps, {args.finetune_steps} finetuning "
        f"steps; mean ± half the spread over seeds):\n{table(results)}")


if __name__ == "__main__":
  main()
