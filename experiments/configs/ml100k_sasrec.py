"""SASRec on MovieLens-100K under RecBole's protocol, for comparison with RecBole 1.2.1.

No filtering, leave-one-out by time (RecBole's float32 time order), full ranking over all 1,682
items, history not excluded, max length 50, hidden 64, CE loss, lr 1e-3, early stopping with
patience 10 on valid NDCG@10. Training (SASRec's defaults): per position, on overlapping windows of
50 items that end every 10 items, each with the loss on its last 10 targets (rec.stride=10), 40
windows a step: every target then sees 40-50 items of context, at a fifth of RecBole's prefix rows.
Then (rec.finish_on_prefixes) from the windows' best state on RecBole's prefixes until early
stopping again: windows alone reach RecBole's validation plateau many times sooner than RecBole
but rank users with long histories worse; the prefix finish closes most of that gap
(docs/results.md, 2026-11-30, "SASRec").

  python launch.py --config=experiments/configs/ml100k_sasrec.py --stages=fetch,prepare,train
"""

from slim_jax.config import Config, DataConfig
from slim_jax.models.recommender import RecConfig
from slim_jax.models.slim import SlimConfig


def get_config() -> Config:
  return Config(name="ml100k_sasrec", data=DataConfig(name="ml-100k", format="recbole"),
                rec=RecConfig(backbone="sasrec", hidden=64, max_len=50, loss="ce", lr=1e-3,
                              patience=10, finish_on_prefixes=True),
                slim=SlimConfig(modes=("plain",)))
