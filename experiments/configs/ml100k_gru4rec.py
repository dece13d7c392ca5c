"""GRU4Rec on MovieLens-100K under RecBole's protocol, for comparison with RecBole 1.2.1.

No filtering, leave-one-out by time (RecBole's float32 time order), full ranking over all 1,682
items, history not excluded, max length 50, hidden 64, CE loss, lr 1e-3, early stopping with
patience 10 on valid NDCG@10. Training: per position (every window of 50 items trains on all 50
next items at once). Validation, selection and test use a moving average of the parameters
(decay 0.999): it raised every seed's test curve (docs/results.md, 2026-11-30, "GRU4Rec");
`--set rec.ema_decay=0` trains and selects the raw parameters, as RecBole.

  python launch.py --config=experiments/configs/ml100k_gru4rec.py --stages=fetch,prepare,train
"""

from slim_jax.config import Config, DataConfig
from slim_jax.models.recommender import RecConfig
from slim_jax.models.slim import SlimConfig


def get_config() -> Config:
  return Config(name="ml100k_gru4rec", data=DataConfig(name="ml-100k", format="recbole"),
                rec=RecConfig(backbone="gru4rec", hidden=64, max_len=50, loss="ce", lr=1e-3,
                              patience=10, ema_decay=0.999),
                slim=SlimConfig(modes=("plain",)))
