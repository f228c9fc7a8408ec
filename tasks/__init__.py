"""SeqIO tasks and mixtures of simvlm_jax, and the TFDS builders behind them.

`import tasks` registers everything (gin files name tasks by string):

  shapes64_image_text   shapes_world/64px: image + one of its five captions
                        (splits: train, validation, compositional)
  shapes64_text         shapes_world_text: text-only statements (splits: train, validation)
  shapes64_pretrain     mixture of the two at the paper's 4,096 : 512 rates
  shapes224_*           the same at 224x224

Build the data first: `python -m tasks.build shapes` (see `tasks/build.py`). Your own data:
`register_image_text_folder`, `register_webdataset` / `register_image_text_parquet` (img2dataset
shards, read in place), `register_text_file` and `register_pretrain_mixture`, callable from Python
or gin (`@register_pretrain_mixture()` as a value).
"""
import simvlm_jax  # noqa: F401  (first: a command's library logging is set up there)
from tasks.folder_builder import ImageTextFolder
from tasks.pretraining import (IMAGE_TEXT_RATE, TEXT_RATE, register_image_text_folder,
                               register_image_text_parquet, register_pretrain_mixture,
                               register_shapes, register_text_file, register_webdataset)
from tasks.shapes_builders import ShapesWorld, ShapesWorldText
from tasks.vocabularies import SHAPES_VOCAB_SIZE, VOCABULARY
from tasks import downstream  # noqa: F401  (registers the downstream tasks)


def register_defaults(data_dir=None) -> dict:
  """(Re-)registers the shapes world's mixtures and every downstream task over `data_dir`
  (default: `SIMVLM_DATA_DIR`'s): what `import tasks` does, again for a program that picks its
  data directory after the import (the demo's `--workdir`). Returns {config: mixture name}."""
  import seqio  # pylint: disable=import-outside-toplevel
  for config in ("64px", "224px"):
    prefix = "shapes" + config.replace("px", "")
    for registry, names in ((seqio.MixtureRegistry, [f"{prefix}_pretrain"]),
                            (seqio.TaskRegistry, [f"{prefix}_image_text", f"{prefix}_text"])):
      for name in names:
        if name in registry.names():
          registry.remove(name)
  for name in downstream.TASKS:
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
  downstream.register_all(data_dir)
  return {config: register_shapes(config, data_dir) for config in ("64px", "224px")}


PRESETS = {"64px": register_shapes("64px"), "224px": register_shapes("224px")}
