"""Tests of the HTML evaluation report (simvlm_jax/report.py): parsed back with html.parser."""
import base64
import html.parser
import io

import numpy as np
import pytest
from PIL import Image

from simvlm_jax import report

NASTY = '<script>alert("x")</script> & \'quotes\' <b>bold</b>'


class _Parsed(html.parser.HTMLParser):
  """Collects every start tag with its attributes, and the text of each classed <td>."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.tags = []  # (tag, attrs dict)
    self.cells = []  # (class, text)
    self._cell = None
    self.title = ""
    self._in_title = False

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    self.tags.append((tag, attrs))
    if tag == "td":
      self._cell = [attrs.get("class"), ""]
    self._in_title = tag == "title"

  def handle_endtag(self, tag):
    if tag == "td" and self._cell is not None:
      self.cells.append(tuple(self._cell))
      self._cell = None
    if tag == "title":
      self._in_title = False

  def handle_data(self, data):
    if self._cell is not None:
      self._cell[1] += data
    if self._in_title:
      self.title += data

  def column(self, cls):
    return [text for c, text in self.cells if c == cls]

  def find(self, tag, **attrs):
    return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def _png_bytes(h, w):
  buffer = io.BytesIO()
  Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def _decode(src):
  assert src.startswith("data:image/jpeg;base64,")
  return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


@pytest.fixture
def parsed(tmp_path):
  rng = np.random.RandomState(0)
  examples = [
      {"image": rng.randint(0, 255, (600, 300, 3), np.uint8), "prompt": NASTY,
       "prediction": "a <dog>\non two lines", "references": ["ref & one", "ref <two>"],
       "score": {"CIDEr": 1.23456, "Bleu_4": None}},
      {"images": [_png_bytes(40, 80), rng.randint(0, 255, (32, 32), np.uint8)],  # NLVR2: two
       "prompt": "left and right?", "prediction": "true", "references": "false", "score": 0.0},
      {"prompt": "text only", "prediction": "x", "references": [], "score": None},
      {"image": np.zeros((8, 8, 4), np.uint8), "prompt": "not shown", "prediction": "y",
       "references": ["z"], "score": 1.0},
  ]
  scores = {"vqa_accuracy": 65.4321, "per_answer_type": {"yes/no": 80.0, "other": 50.0},
            "SPICE": None, "SPICE_unavailable": "offline <no CoreNLP>"}
  path = tmp_path / "sub" / "report.html"
  assert report.write_html_report(str(path), "Eval <step 10> & more", scores, examples,
                                  max_examples=3) == str(path)
  page = path.read_text(encoding="utf-8")
  p = _Parsed()
  p.feed(page)
  p.close()
  return page, p


def test_structure_and_scores_table(parsed):
  page, p = parsed
  assert page.startswith("<!DOCTYPE html>")
  assert p.title == "Eval <step 10> & more"
  assert p.column("metric") == ["vqa_accuracy", "per_answer_type/yes/no", "per_answer_type/other",
                                "SPICE", "SPICE_unavailable"]
  assert p.column("value") == ["65.43", "80", "50", "n/a", "offline <no CoreNLP>"]
  assert len(p.find("table", **{"class": "scores"})) == 1
  assert len(p.find("table", **{"class": "examples"})) == 1


def test_one_row_per_example_up_to_the_limit(parsed):
  page, p = parsed
  rows = [a["id"] for t, a in p.tags if t == "tr" and "id" in a]
  assert rows == ["example-0", "example-1", "example-2"]
  assert "Showing 3 of 4 examples." in page
  assert "not shown" not in page
  assert p.column("prompt") == [NASTY, "left and right?", "text only"]
  assert p.column("prediction") == ["a <dog>\non two lines", "true", "x"]
  assert p.column("references") == ["ref & oneref <two>", "false", ""]
  assert p.column("score") == ["CIDEr: 1.235Bleu_4: n/a", "0", "n/a"]
  assert p.column("images")[2] == "(no image)"


def test_text_is_escaped(parsed):
  page, p = parsed
  assert "<script" not in page and NASTY not in page
  assert not p.find("script") and not p.find("b")
  assert len(p.find("li")) == 3  # only the references' own <li>s


def test_images_are_embedded_thumbnails(parsed):
  _, p = parsed
  images = p.find("img")
  assert [a["alt"] for a in images] == [
      "example 0 image 0", "example 1 image 0", "example 1 image 1"]
  # Nothing is fetched from elsewhere: every src is a data URI.
  assert all(a["src"].startswith("data:") for t, a in p.tags if "src" in a)
  assert not any("href" in a for _, a in p.tags)
  sizes = [_decode(a["src"]).size for a in images]  # (width, height)
  assert sizes[0] == (128, 256)  # 300x600 shrunk to 256 on the long side, aspect kept
  assert sizes[1] == (80, 40)  # small images are not enlarged
  assert sizes[2] == (32, 32)  # grayscale array


def test_image_inputs_are_checked():
  with pytest.raises(TypeError, match="uint8"):
    report.image_data_uri(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="shape"):
    report.image_data_uri(np.zeros((4, 4, 2), np.uint8))
  assert _decode(report.image_data_uri(np.zeros((4, 4, 1), np.uint8))).size == (4, 4)
