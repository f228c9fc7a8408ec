"""What an evaluation leaves for people: every prediction as JSON lines, and an HTML report."""
import json
from typing import Any

import numpy as np
from etils import epath

from simvlm_jax.evaluators.scoring import CAPTION_TASKS, text
from simvlm_jax.report import write_html_report


def jsonable(x: Any) -> Any:
  if isinstance(x, np.ndarray):
    return [jsonable(v) for v in x.tolist()]
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.generic):
    return x.item()
  return x


def write_results(output_dir: epath.Path, step: int, title: str, benchmark: str, result: Any,
                  report_examples: int) -> None:
  """`predictions_<step>.jsonl` (every example) and `report_<step>.html` (the first
  `report_examples`, with images) in `output_dir`."""
  rows, report = [], []
  for i, (prediction, m, s) in enumerate(zip(result.predictions, result.meta,
                                             result.per_example)):
    record = {"index": i, "prompt": text(m.get("inputs_pretokenized", "")),
              "prediction": prediction, "score": s,
              **{k: jsonable(v) for k, v in m.items() if k != "inputs_pretokenized"}}
    rows.append(record)
    if i < report_examples:
      refs = (m.get("captions") if benchmark in CAPTION_TASKS else
              m.get("answers") if benchmark == "vqa_v2" else m.get("targets_pretokenized"))
      refs = [r for r in jsonable(refs) if r] if isinstance(refs, np.ndarray) else jsonable(refs)
      prompt = record["prompt"]
      if "premise_pretokenized" in m:
        prompt = f"premise: {text(m['premise_pretokenized'])}\nhypothesis: {prompt}"
      example = {"prompt": prompt, "prediction": prediction, "references": refs, "score": s}
      if i in result.images:
        image = result.images[i]
        example["images" if image.ndim == 4 else "image"] = list(image) if image.ndim == 4 \
            else image
      report.append(example)
  (output_dir / f"predictions_{step}.jsonl").write_text(
      "".join(json.dumps(record) + "\n" for record in rows))
  write_html_report(str(output_dir / f"report_{step}.html"), title, result.scores, report)
