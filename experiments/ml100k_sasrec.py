"""SASRec on MovieLens-100K under RecBole's protocol, for comparison with RecBole 1.2.1.

No filtering, leave-one-out by time (RecBole's float32 time order), full ranking over all 1,682
items, history not excluded, max length 50, hidden 64, CE loss, lr 1e-3, early stopping with
patience 10 on valid NDCG@10. Training (SASRec's defaults): per position, on overlapping windows of
50 items that end every 10 items, each with the loss on its last 10 targets (rec.stride=10), 40
windows a step: every target then sees 40-50 items of context, as in RecBole's prefixes, at a
fifth of their rows.
Measured against tiled windows (stride 50, 8 a step), seed 2020: best valid NDCG@10 0.0685 against
0.0636, and RecBole's best valid 0.0672 reached 4.8x sooner than RecBole (README).

  python launch.py --config=experiments/ml100k_sasrec.py --stages=fetch,prepare,train
"""

from slim_jax.config import Config, DataConfig
from slim_jax.models.recommender import RecConfig
from slim_jax.models.slim import SlimConfig


def get_config() -> Config:
  return Config(name="ml100k_sasrec", data=DataConfig(name="ml-100k", format="recbole"),
                rec=RecConfig(backbone="sasrec", hidden=64, max_len=50, loss="ce", lr=1e-3,
                              patience=10),
                slim=SlimConfig(modes=("plain",)))
