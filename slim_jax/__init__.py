"""slim-jax: SLIM (step-by-step LLM reasoning distillation for sequential recommendation) in JAX/Flax."""
