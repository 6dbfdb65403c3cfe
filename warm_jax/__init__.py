"""warm_jax: Weight Averaged Reward Models (WARM) in JAX."""
