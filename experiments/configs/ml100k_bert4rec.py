"""BERT4Rec on MovieLens-100K under RecBole's protocol, for comparison with RecBole 1.2.1.

No filtering, leave-one-out by time (RecBole's float32 time order), full ranking over all 1,682
items, history not excluded, max length 50, hidden 64, CE loss, lr 1e-3, early stopping with
patience 10 on valid NDCG@10. Training as RecBole's: every prefix, 256 a step; half the batches
mask only their rows' last item, the others 20% of their items. Windows train an epoch far
faster and reach less (`--set rec.train_mode=per_position --set rec.mask_last_ratio=0`;
docs/results.md, 2026-11-30, "BERT4Rec").

  python launch.py --config=experiments/configs/ml100k_bert4rec.py --stages=fetch,prepare,train
"""

from slim_jax.config import Config, DataConfig
from slim_jax.models.recommender import RecConfig
from slim_jax.models.slim import SlimConfig


def get_config() -> Config:
  return Config(name="ml100k_bert4rec", data=DataConfig(name="ml-100k", format="recbole"),
                rec=RecConfig(backbone="bert4rec", hidden=64, max_len=50, loss="ce", lr=1e-3,
                              train_mode="last_position", mask_last_ratio=0.5, patience=10),
                slim=SlimConfig(modes=("plain",)))
