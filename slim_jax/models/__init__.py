"""Flax models: the LLaMA student with LoRA, and the sequential recommender backbones."""
