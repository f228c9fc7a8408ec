"""COCO caption metrics through pycocoevalcap, as its `COCOEvalCap.evaluate` computes them.

Both sides go through the Stanford PTB tokenizer (Java; lowercases, drops punctuation tokens), then:
BLEU-1..4 (corpus level, "closest" reference length for the brevity penalty), METEOR 1.5 (Java),
ROUGE-L, and CIDEr-D (pycocoevalcap's `Cider` is CIDEr-D: clipped n-gram counts, a Gaussian length
penalty, sigma 6, x10, document frequencies from the evaluated corpus's references).

SPICE is not computed: pycocoevalcap's SPICE downloads Stanford CoreNLP on first use and this
environment is offline. The result says so ({"SPICE": None, "SPICE_unavailable": reason}) and a
warning is logged, so a missing SPICE is never mistaken for a score.

Java is required (the PTB tokenizer and METEOR are jars that ship inside the pycocoevalcap wheel); a
missing `java` raises a RuntimeError that names it.
"""
import contextlib
import functools
import shutil
import threading
from typing import Any, Hashable, Mapping, Sequence

from absl import logging
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

ALL_METRICS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr")
SPICE_UNAVAILABLE = (
    "SPICE not computed: pycocoevalcap's SPICE downloads Stanford CoreNLP 3.6.0 (jar and models) "
    "on first use, and this environment has no network access.")
# Generous: METEOR scores 5000 images x 5 references in about 15 s (start-up included) on 2 CPU
# cores. This only guards against a wedged Java subprocess.
METEOR_TIMEOUT_S = 600.0


def _require_java() -> None:
  if shutil.which("java") is None:
    raise RuntimeError(
        "COCO caption metrics need Java: pycocoevalcap's PTB tokenizer (Stanford CoreNLP) and "
        "METEOR are jars run with `java`, which was not found on PATH. Install a JRE (e.g. "
        "`apt-get install default-jre-headless`).")


def _one_line(text: str) -> str:
  # Both jars read one caption per line: a line break inside a caption would shift every caption
  # after it onto the wrong image (and stall METEOR's request/response protocol). Collapsing
  # whitespace changes no token.
  return " ".join(text.split())


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
  """{id: [caption, ...]} -> {id: [tokenized caption, ...]} with pycocoevalcap's PTBTokenizer."""
  _require_java()
  tokenized = PTBTokenizer().tokenize(
      {k: [{"caption": _one_line(c)} for c in caps] for k, caps in captions.items()})
  # The wrapper pairs output lines with ids by zip, so a short output would pass silently.
  for k, caps in captions.items():
    if len(tokenized.get(k, ())) != len(caps):
      raise RuntimeError(f"PTB tokenizer returned {len(tokenized.get(k, ()))} captions for id "
                         f"{k!r}, expected {len(caps)}; the java tokenizer probably failed")
  return tokenized


class _Meteor(Meteor):
  """pycocoevalcap's METEOR with a close() that always ends the Java process.

  The upstream `__del__` first takes a lock that an exception inside `compute_score` leaves held,
  and would then block forever; this close() needs no lock and is safe to call twice.
  """

  def close(self) -> None:
    p = self.meteor_p
    if p.poll() is None:
      p.kill()
    p.wait()
    for stream in (p.stdin, p.stdout, p.stderr):
      with contextlib.suppress(OSError):
        stream.close()

  __del__ = close


def _meteor(gts: dict, res: dict, timeout_s: float) -> tuple[float, list[float]]:
  meteor = _Meteor()
  process = meteor.meteor_p
  # If METEOR wedges, killing it makes the pending readline return EOF, so the call fails instead
  # of hanging.
  watchdog = threading.Timer(timeout_s, process.kill)
  watchdog.start()
  try:
    return meteor.compute_score(gts, res)
  except (ValueError, OSError) as e:  # float(b"") or a broken pipe once the process is gone
    process.kill()
    process.wait()
    detail = process.stderr.read().decode(errors="replace").strip()
    raise RuntimeError(f"METEOR (java) died or ran past {timeout_s:g} s; its stderr: "
                       f"{detail or '(empty)'}") from e
  finally:
    watchdog.cancel()
    meteor.close()


def score_tokenized(references: Mapping[Hashable, list[str]],
                    predictions: Mapping[Hashable, list[str]],
                    metrics: Sequence[str] = ALL_METRICS,
                    meteor_timeout_s: float = METEOR_TIMEOUT_S
                    ) -> tuple[dict[str, float], dict[Hashable, dict[str, float]]]:
  """Scores PTB-tokenized captions: (corpus scores, {id: per-image scores}).

  `predictions` maps each id to a one-element list, `references` to one or more captions.
  """
  unknown = set(metrics) - set(ALL_METRICS)
  if unknown:
    raise ValueError(f"unknown caption metrics {sorted(unknown)}; choose from {ALL_METRICS}")
  ids = list(references)
  corpus: dict[str, float] = {}
  per_image: dict[Hashable, dict[str, float]] = {k: {} for k in ids}

  def record(name, score, scores):
    corpus[name] = float(score)
    for k, s in zip(ids, scores):
      per_image[k][name] = float(s)

  if "Bleu" in metrics:
    bleu, bleu_per_image = Bleu(4).compute_score(references, predictions, verbose=0)
    for n in range(4):
      record(f"Bleu_{n + 1}", bleu[n], bleu_per_image[n])
  if "METEOR" in metrics:
    _require_java()
    record("METEOR", *_meteor(references, predictions, meteor_timeout_s))
  if "ROUGE_L" in metrics:
    record("ROUGE_L", *Rouge().compute_score(references, predictions))
  if "CIDEr" in metrics:
    record("CIDEr", *Cider().compute_score(references, predictions))
  return corpus, per_image


def coco_caption_scores(predictions: Mapping[Hashable, str],
                        references: Mapping[Hashable, Sequence[str]],
                        metrics: Sequence[str] = ALL_METRICS,
                        meteor_timeout_s: float = METEOR_TIMEOUT_S
                        ) -> tuple[dict[str, Any], dict[Hashable, dict[str, float]]]:
  """(corpus scores, per-image scores) for one caption per id against its references.

  Corpus scores hold "Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr" (those asked for in
  `metrics`; leave METEOR out to skip its ~10 s Java start-up) plus "SPICE": None and
  "SPICE_unavailable". Scores are fractions (CIDEr-D up to 10), not percentages.
  """
  if set(predictions) != set(references):
    missing, extra = set(references) - set(predictions), set(predictions) - set(references)
    raise ValueError(f"prediction ids differ from reference ids: missing "
                     f"{sorted(map(str, missing))[:5]}, extra {sorted(map(str, extra))[:5]}")
  if not references:
    raise ValueError("no captions to score")
  empty = [k for k, refs in references.items() if len(refs) == 0]
  if empty:
    raise ValueError(f"ids without references: {empty[:5]}")
  ids = list(references)
  tokenized = ptb_tokenize({**{("ref", k): references[k] for k in ids},
                            **{("pred", k): [predictions[k]] for k in ids}})
  corpus, per_image = score_tokenized({k: tokenized[("ref", k)] for k in ids},
                                      {k: tokenized[("pred", k)] for k in ids},
                                      metrics, meteor_timeout_s)
  _warn_spice_unavailable()
  return {**corpus, "SPICE": None, "SPICE_unavailable": SPICE_UNAVAILABLE}, per_image


@functools.cache
def _warn_spice_unavailable() -> None:
  logging.warning(SPICE_UNAVAILABLE)  # once per process; the scores say it too


def coco_caption_metrics(predictions: Mapping[Hashable, str],
                         references: Mapping[Hashable, Sequence[str]]) -> dict[str, Any]:
  """Corpus-level COCO caption metrics; see `coco_caption_scores`."""
  return coco_caption_scores(predictions, references)[0]


def _text(x: Any) -> str:
  """seqio hands over numpy bytes for string features."""
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def coco_caption_metric(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
  """seqio metric fn. Each target is the list of reference captions of one image.

  Returns the numeric scores only (SPICE's absence is logged as a warning by
  `coco_caption_scores`), since every seqio metric value must be a number.
  """
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets for {len(predictions)} predictions")
  scores = coco_caption_metrics({i: _text(p) for i, p in enumerate(predictions)},
                                {i: [_text(r) for r in t] for i, t in enumerate(targets)})
  return {k: v for k, v in scores.items() if isinstance(v, float)}
