"""simvlm_jax: SimVLM-style vision-language pretraining in JAX/Flax."""
import setuptools

# Pinned together: these versions install side by side on Python 3.11.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "gin-config==0.5.0",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "seqio==0.0.20",
    "sentencepiece==0.2.3",
    "clu==0.0.12",
    "tensorboard==2.21.0",
    "pillow==13.0.0",
    "pyarrow==26.0.1",
    "pycocoevalcap==1.2",
]

setuptools.setup(
    name="simvlm_jax",
    version="0.1.0",
    description="SimVLM (PrefixLM vision-language pretraining) in JAX/Flax.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["simvlm_jax", "simvlm_jax.*", "tasks", "tasks.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest==8.3.4", "pytest-xdist==3.6.1"],
        # Orbax asks a gs:// bucket's layout (hierarchical namespace) through this client.
        "gcs": ["google-cloud-storage==3.17.1"],
        # benchmarks/peer_pytorch.py: the same model in eager PyTorch + transformers.
        "peer": ["torch==2.13.0", "transformers==5.25.0"],
    },
)
