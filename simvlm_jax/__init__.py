"""simvlm_jax: SimVLM (PrefixLM vision-language pretraining) in JAX/Flax."""
import sys as _sys

# Run as a command (`python -m simvlm_jax.<command>`, or `python -m tasks.build`, which imports
# this package first): silence the libraries' C++ logging before they load (see `console`).
# Imported as a library, the process's logging is left alone.
if _sys.argv[:1] == ["-m"]:
  from simvlm_jax import console as _console
  _console.quiet_native()
