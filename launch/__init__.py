"""Launchers: the same `python -m simvlm_jax.train` on every host of a Cloud TPU VM pod
(`launch.tpu_pod`) or of a SLURM GPU cluster (`launch.slurm`). Run from the repository checkout."""
