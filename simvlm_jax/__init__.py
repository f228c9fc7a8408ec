"""simvlm_jax: SimVLM (PrefixLM vision-language pretraining) in JAX/Flax."""
