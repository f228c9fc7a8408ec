"""A self-contained HTML report of one evaluation: the scores, then one row per example.

Open the file in any browser; it needs nothing else. Images are embedded as base64 JPEG thumbnails
(data URIs), made from uint8 arrays ([H, W], [H, W, 1], [H, W, 3] or [H, W, 4]) or encoded image
bytes. Every piece of text is HTML-escaped.

Each example is a dict with:
  image or images: one image, or a list (NLVR2 has two); leave both out for a text-only example.
  prompt, prediction: str.
  references: one str or a list of str.
  score: a number, a {name: number} dict (e.g. per-image caption metrics), or None.
"""
import base64
import html
import io
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from PIL import Image
from etils import epath

THUMBNAIL_SIZE = 256  # longest side, in pixels

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f0f0f0; }
table.scores td.value { font-family: monospace; }
table.examples td { white-space: pre-wrap; max-width: 28em; }
table.examples img { height: 160px; width: auto; margin: 2px; }
td.score { font-family: monospace; }
ul { margin: 0; padding-left: 1.2em; }
"""


def _format_value(value: Any) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, (float, np.floating)):
    return f"{float(value):.4g}"
  return str(value)


def _flatten(scores: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
  """Nested dicts (e.g. VQA's per answer type scores) become "parent/child" rows."""
  rows = []
  for key, value in scores.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      rows.extend(_flatten(value, name + "/"))
    else:
      rows.append((name, value))
  return rows


def image_data_uri(image: Any, size: int = THUMBNAIL_SIZE) -> str:
  """A uint8 array or encoded image bytes -> "data:image/jpeg;base64,..." of a thumbnail."""
  if isinstance(image, (bytes, bytearray)):
    pil = Image.open(io.BytesIO(image))
  else:
    array = np.asarray(image)
    if array.dtype != np.uint8:
      raise TypeError(f"images must be uint8 arrays or encoded bytes, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
      array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
      raise ValueError(f"image array of shape {array.shape} is not [H, W], [H, W, 1|3|4]")
    pil = Image.fromarray(array)
  pil = pil.convert("RGB")  # JPEG has no alpha or palette
  pil.thumbnail((size, size), Image.Resampling.LANCZOS)
  buffer = io.BytesIO()
  pil.save(buffer, format="JPEG", quality=90)
  return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _esc(text: Any) -> str:
  if isinstance(text, bytes):
    text = text.decode("utf-8", errors="replace")
  return html.escape(str(text), quote=True)


def _images_cell(example: Mapping[str, Any], index: int) -> str:
  images = example.get("images")
  if images is None:
    images = [example["image"]] if example.get("image") is not None else []
  tags = [f'<img src="{image_data_uri(image)}" alt="example {index} image {i}">'
          for i, image in enumerate(images)]
  return "".join(tags) or "(no image)"


def _references_cell(references: Any) -> str:
  if references is None:
    return ""
  if isinstance(references, (str, bytes)):
    references = [references]
  return "<ul>" + "".join(f"<li>{_esc(r)}</li>" for r in references) + "</ul>"


def _score_cell(score: Any) -> str:
  if isinstance(score, Mapping):
    return "<br>".join(f"{_esc(k)}: {_esc(_format_value(v))}" for k, v in score.items())
  return _esc(_format_value(score))


def render_html_report(title: str, scores: Mapping[str, Any], examples: Sequence[Mapping[str, Any]],
                       max_examples: Optional[int] = None) -> str:
  """The report as an HTML string; `max_examples` keeps the first N example rows."""
  shown = list(examples[:max_examples] if max_examples is not None else examples)
  parts = [
      "<!DOCTYPE html>",
      '<html lang="en"><head><meta charset="utf-8">',
      f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
      f"<h1>{_esc(title)}</h1>",
      '<table class="scores"><thead><tr><th>metric</th><th>value</th></tr></thead><tbody>',
  ]
  for name, value in _flatten(scores):
    parts.append(f'<tr><td class="metric">{_esc(name)}</td>'
                 f'<td class="value">{_esc(_format_value(value))}</td></tr>')
  parts += [
      "</tbody></table>",
      f'<p class="count">Showing {len(shown)} of {len(examples)} examples.</p>',
      '<table class="examples"><thead><tr><th>#</th><th>image</th><th>prompt</th>'
      "<th>prediction</th><th>references</th><th>score</th></tr></thead><tbody>",
  ]
  for i, example in enumerate(shown):
    parts.append(
        f'<tr id="example-{i}"><td>{i}</td>'
        f'<td class="images">{_images_cell(example, i)}</td>'
        f'<td class="prompt">{_esc(example.get("prompt", ""))}</td>'
        f'<td class="prediction">{_esc(example.get("prediction", ""))}</td>'
        f'<td class="references">{_references_cell(example.get("references"))}</td>'
        f'<td class="score">{_score_cell(example.get("score"))}</td></tr>')
  parts.append("</tbody></table></body></html>\n")
  return "\n".join(parts)


def write_html_report(path: str, title: str, scores: Mapping[str, Any],
                      examples: Sequence[Mapping[str, Any]],
                      max_examples: Optional[int] = None) -> str:
  """Writes the report to `path` (any epath: local or gs://; parent folders are created) and
  returns the path. Written to a temporary file first, then renamed, so a reader never sees half
  a report.
  """
  page = render_html_report(title, scores, examples, max_examples)
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
  tmp.write_text(page, encoding="utf-8")
  tmp.replace(target)
  return path
