"""Evaluations of a model, one module per kind (big_vision's `evaluators/`):

  official_metric  `Evaluator`: decodes a downstream task's split (greedy, beam search, or a
                   classifier head's top answer) over host shards and scores it with the task's
                   official metric; the `eval` command and the evaluators inside training use it.
  in_training      `OfficialMetric` (the gin spec of one evaluator inside training) and `Running`
                   (the loop's adapter: the evaluators due at a step, their scalars and lines).
  teacher_forced   loss and token accuracy on held-out batches inside training.
  scoring          each benchmark's official metric, the metrics a task adds, and their scalars.
  writers          predictions as JSON lines and the HTML report.
"""
from simvlm_jax.evaluators import scoring, teacher_forced, writers
from simvlm_jax.evaluators.in_training import (DEFAULT_CAPTION_METRICS, OfficialMetric, Running,
                                               check)
from simvlm_jax.evaluators.official_metric import (IMAGE_CONTROLS, Evaluator, Result,
                                                   control_images)
from simvlm_jax.evaluators.scoring import (CAPTION_TASKS, CLASS_LABELS, benchmark_of,
                                           example_metrics_of, headline, numeric, scalars, score,
                                           summary)
from simvlm_jax.evaluators.writers import write_results
