"""Trainers: the one training loop and the step functions it runs (recommenders, distillation)."""
