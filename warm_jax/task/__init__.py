"""The built-in task's stages: what samples from the pretrained policy and labels with the oracle.

``warm_jax.data`` is the library these use (tokenizers, the review grammar, dataset writers and readers); it
imports nothing from here, nor from training or policy modules.
"""
