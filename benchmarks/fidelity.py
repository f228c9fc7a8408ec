r"""Fidelity: how close SimVLM-Tiny gets to the shapes world's ceiling in a longer CPU schedule.

  .venv/bin/python benchmarks/fidelity.py [--workdir fidelity_output]

The demo's pipeline (`tasks.demo`) with more of everything: pretraining for 6,000 steps
(`gin/runs/fidelity_pretrain.gin`, about 35 minutes on the 2-core CPU), 16,000 training images
per downstream benchmark, longer finetuning (1,000 steps for VQA and SNLI-VE, 300 for the others),
and evaluation on 400 validation examples each. Prints the
downstream table (finetuned from the pretrained model and from scratch, zero-shot captioning,
caption correctness, text-only NLI transfer) against the targets below, and writes
<workdir>/results.json. The shapes world is fully learnable (VQA's majority answer scores 100,
NLVR2 and SNLI-VE labels are exact), so the targets say where a working framework should get.
Finished runs are reused: run it again to finish an interrupted benchmark.
"""
import argparse
import json
import os
import sys

# (row of the demo's downstream results, its task, metric, target)
TARGETS = (("VQA/pretrained", "shapes_vqa_v2", "VQA accuracy", 90.0),
           ("NLVR2/pretrained", "shapes_nlvr2", "accuracy", 90.0),
           ("SNLI-VE/pretrained", "shapes_snli_ve", "accuracy", 90.0),
           ("captioning/pretrained", "shapes_coco_captions", "CIDEr", 150.0),
           ("zero-shot captioning", "shapes_coco_captions", "CIDEr", 100.0))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default=os.path.abspath("fidelity_output"))
  parser.add_argument("--finetune_steps", type=int, default=300)
  # VQA and SNLI-VE are still learning at 300 steps (less than an epoch of their questions and
  # hypotheses); NLVR2 and captioning are not (RESULTS.md, "Fidelity with the patch-16 Tiny").
  parser.add_argument("--finetune_steps_for", nargs="*", default=["VQA=1000", "SNLI-VE=1000"],
                      metavar="NAME=STEPS")
  parser.add_argument("--downstream_train", type=int, default=16000,
                      help="training images per downstream benchmark")
  parser.add_argument("--eval_examples", type=int, default=400)
  args = parser.parse_args(argv)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from simvlm_jax import console
  console.quiet_native()  # a script, not `python -m`: silence the libraries' C++ logging here
  from simvlm_jax import demo
  results = demo.main(["--workdir", args.workdir, "--pretrain_gin", "runs/fidelity_pretrain.gin",
                       "--skip_text_only", "--finetune_steps", str(args.finetune_steps),
                       *(f"--finetune_steps_for={item}" for item in args.finetune_steps_for),
                       "--downstream_train", str(args.downstream_train), "--downstream_eval",
                       "400", "--downstream_eval_examples", str(args.eval_examples)])
  downstream = results["downstream"]
  print(f"\nfidelity (shapes world, {args.eval_examples} validation examples each, "
        f"{results['minutes']:.0f} min):")
  print(f"  {'row':<24} {'metric':<13} {'target':>7} {'pretrained':>11} {'from scratch':>13} "
        f"{'steps':>6}")
  for row, task, metric, target in TARGETS:
    value = demo.headline(task, downstream[row])
    scratch = downstream.get(row.replace("pretrained", "scratch")) if "/" in row else None
    scratch_text = f"{demo.headline(task, scratch):>13.1f}" if scratch else f"{'-':>13}"
    steps = results["finetune steps"].get(row.split("/")[0], "-")
    print(f"  {row:<24} {metric:<13} {target:>7.0f} {value:>11.1f} {scratch_text} {steps:>6}"
          f"{'' if value >= target else '   (below target)'}")
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
