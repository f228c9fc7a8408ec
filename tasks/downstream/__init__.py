"""Downstream benchmarks: TFDS readers of the official raw formats, and their SeqIO Tasks.

`import tasks` (or `tasks.downstream`) registers, over the TFDS data dir (SIMVLM_DATA_DIR):

  task                 TFDS dataset              raw files (under SIMVLM_DOWNSTREAM_DIR)
  coco_captions        coco_karpathy/official    coco/     dataset_coco.json, train2014/, val2014/
  nocaps               nocaps/official           nocaps/   nocaps_val_4500_captions.json, val/
  vqa_v2               vqa_v2/official           vqa_v2/   v2_*_questions/annotations.json (+ coco/)
  nlvr2                nlvr2/official            nlvr2/    {train,dev,test1}.json, images/
  snli_ve              snli_ve/official          snli_ve/  snli_ve_*.jsonl, flickr30k_images/
  snli_ve_text         snli_ve/official_text     snli_ve/  (text premises only)
  shapes_<task>        <dataset>/shapes[_text]   shapes/<same>, shapes/text_nli/ for the text NLI

The task features are listed in `tasks.downstream.registration`, the raw formats in each reader's
module (coco_karpathy, nocaps, vqa_v2, nlvr2, snli_ve). The shapes world's versions are generated
in the official formats by `tasks.shapes_downstream`. Build: `python -m tasks.build downstream`
(official files) and `python -m tasks.build shapes_downstream` (generates the shapes world's and
builds them).
"""
from tasks.downstream.coco_karpathy import CocoKarpathy
from tasks.downstream.nlvr2 import Nlvr2
from tasks.downstream.nocaps import Nocaps
from tasks.downstream.registration import BENCHMARKS, register_all, register_downstream
from tasks.downstream.snli_ve import SnliVe
from tasks.downstream.vqa_v2 import VqaV2, load_answer_vocab

TASKS = register_all()
