"""SimVLM models: conv stage, Transformer stacks and the module that wires them."""
from simvlm_jax.models.config import ModelConfig
from simvlm_jax.models.simvlm import SimVLM
