"""The SLIM paper's setting: an Amazon category, a ChatGPT teacher, a LLaMA-2-7B student on a TPU.

Your own files (nothing here is downloaded at run time):
  data.path     the 2014 dump: reviews_Video_Games_5.json.gz (meta_Video_Games.json.gz beside it)
  distill.checkpoint   a Hugging Face LLaMA-2-7B directory (config.json + safetensors)
  OPENAI_API_KEY       in the environment, for the teacher

  python launch.py --config=experiments/configs/amazon_games_chatgpt_llama2_7b.py --multiprocess \
      --set data.path=/data/amazon/reviews_Video_Games_5.json.gz \
      --set distill.checkpoint=/models/Llama-2-7b-hf --workdir=/mnt/shared/slim_games

Dry-run the teacher's cost first: --stages=prepare,teacher --set teacher.max_users=1 shows the
estimate for the whole dataset in the log before a single request is sent.
The mesh shards the 7B student over fsdp (a v4-32 / v5e-32 slice: 32 chips); the recommender
stage is data parallel over the same devices.
"""

from slim_jax.config import Config, DataConfig, MeshConfig
from slim_jax.embed import EncoderConfig
from slim_jax.models.recommender import RecConfig
from slim_jax.prompts import PromptConfig
from slim_jax.student import StudentConfig
from slim_jax.teacher import TeacherConfig
from slim_jax.train.distill import DistillConfig


def get_config() -> Config:
  return Config(
      name="amazon_games_chatgpt_llama2_7b",
      data=DataConfig(name="amazon-games", format="amazon", user_core=5, item_core=5),
      mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
      prompt=PromptConfig(domain="games", max_prompt_tokens=1024),
      teacher=TeacherConfig(kind="openai", model="gpt-3.5-turbo", max_tokens=512,
                            concurrency=16, requests_per_minute=3500, tokens_per_minute=90000),
      distill=DistillConfig(lora_rank=8, lora_alpha=16.0, lora_targets=("q_proj", "v_proj"),
                            steps=2000, batch_size=64, lr=2e-4, warmup_steps=100,
                            max_rationale_tokens=512, buckets=(1024, 1536, 2048),
                            dtype="bfloat16", base_dtype="bfloat16",
                            remat_policy="nothing_saveable", scan_layers=True),
      student=StudentConfig(max_tokens=512, batch_size=64, dtype="bfloat16"),
      encoder=EncoderConfig(kind="minilm"),
      rec=RecConfig(backbone="sasrec"),
  )
