"""Fixtures shared by the test modules, so that no test module imports another.

Tiny LLaMA weights and tokenizers; the distillation fixture (synthetic users, a teacher's
rationales for them and a tiny random student on disk); the bigram teacher; prepared data from
item sequences; tiny BERT and sentence-transformers directories; synthetic teacher requests.
Every fixture is built from a seed, on the host, in well under a second, but one: the tiny
pipeline's run through launch.py, which takes a minute and so runs once per test process.
"""

import atexit
import collections
import dataclasses
import functools
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import safetensors.numpy
import transformers
from absl.testing import absltest
from flax import traverse_util
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from slim_jax import assets, parallel, prompts, rationales
from slim_jax.checkpoints import hf
from slim_jax.data.preprocess import DataConfig
from slim_jax.data import formats, preprocess
from slim_jax.data.formats import ItemMeta
from slim_jax.models import bert, llama
from slim_jax.prompts import PromptConfig
from slim_jax.teacher import TeacherConfig
from slim_jax.train.distill import DistillConfig
from tests import fake_openai_server

# ---------------------------------------------------------------------------------------------
# Tiny LLaMA models and tokenizers.

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY_LLAMA = dataclasses.replace(llama.PRESETS["tiny"], vocab_size=256,
                                 max_position_embeddings=512)


def random_params(config, seed: int = 0):
  """Random LLaMA weights drawn on the host: no compilation per parameter shape."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (1 + 0.1 * rng.standard_normal(s.shape) if len(s.shape) == 1 else
                                 0.1 * rng.standard_normal(s.shape)).astype(np.float32),
                      hf.param_shapes(config))


def word_tokenizer(texts):
  """A word-level tokenizer over `texts` with ChatML's specials: prompts of ~150 tokens, not ~700
  bytes, so a test step is cheap."""
  split = pre_tokenizers.Whitespace()
  words = sorted({w for text in texts for w, _ in split.pre_tokenize_str(text)})
  vocab = {w: i for i, w in enumerate(["[UNK]", "<|im_start|>", "<|im_end|>"] + words)}
  core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  core.pre_tokenizer = split
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=core, chat_template=CHATML, unk_token="[UNK]", eos_token="<|im_end|>",
      pad_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])


def byte_tokenizer():
  """A byte-level tokenizer (256 byte tokens, no merges) with ChatML's specials: tiny, instant."""
  vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
  core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  core.decoder = decoders.ByteLevel()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=core, chat_template=CHATML, eos_token="<|im_end|>", pad_token="<|im_end|>")
  tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
  return tokenizer


def bigram_params(config, transitions: dict[int, int], seed: int = 0):
  """LLaMA params whose attention and MLP write nothing, so the next token depends only on the
  current one; the head maps each `transitions` key to its value by a wide margin."""
  rng = np.random.default_rng(seed)
  params = {path: (np.ones(s.shape, np.float32) if path[-1] == "scale" else
                   np.zeros(s.shape, np.float32) if path[-2] in ("o_proj", "down_proj") else
                   rng.normal(0, 0.02, s.shape).astype(np.float32))
            for path, s in traverse_util.flatten_dict(hf.param_shapes(config)).items()}
  embed = rng.normal(0, 1, params[("embed_tokens", "embedding")].shape).astype(np.float32)
  params[("embed_tokens", "embedding")] = embed
  for current, following in transitions.items():
    params[("lm_head", "kernel")][:, following] += 10 * embed[current] / np.linalg.norm(
        embed[current])
  return traverse_util.unflatten_dict(params)


def bigram_fixture(directory: pathlib.Path):
  """(prepared, tokenizer): six toy users without item metadata, and at directory/bigram a tiny
  LLaMA that answers any prompt ending in ":" with "A" and stops."""
  tokenizer = byte_tokenizer()
  colon, letter = tokenizer.encode(":")[0], tokenizer.encode("A")[0]
  config = dataclasses.replace(llama.PRESETS["tiny"], vocab_size=len(tokenizer),
                               max_position_embeddings=2048)
  params = bigram_params(config, {colon: letter, letter: tokenizer.eos_token_id})
  hf.save_hf(directory / "bigram", config, params, tokenizer)
  rows = [(f"u{u}", f"i{(u * 3 + k) % 11}", k) for u in range(6) for k in range(4 + u)]
  users, items, times = zip(*rows)
  prepared = preprocess.prepare(formats.RawDataset(
      "toy", np.asarray(users, str), np.asarray(items, str), np.asarray(times, float),
      np.full(len(rows), np.nan, np.float32), {}, {}), DataConfig())
  return prepared, tokenizer


# ---------------------------------------------------------------------------------------------
# Distillation: synthetic users, their teacher rationales and a tiny random student.

PROMPT = PromptConfig(domain="generic", max_prompt_tokens=192, history="prefix")
STUDENT_PROMPT = prompts.student_config(PROMPT)  # what distillation and the student read
ITEMS = 12


def rationale(last_item: int) -> str:
  """The synthetic teacher: a fixed three-step template whose words follow the last item seen."""
  kind = ("drama", "comedy")[last_item % 2]
  return (f"Step 1: the user likes {kind} . Step 2: more {kind} . "
          f"Step 3: item i{(last_item + 1) % ITEMS} and item i{(last_item + 2) % ITEMS} .")


def distill_prepared(users: int = 24, seed: int = 0) -> preprocess.Prepared:
  """`users` users of 5 to 8 random items among ITEMS, without item metadata."""
  rng = np.random.default_rng(seed)
  rows = [(f"u{u}", f"i{i}", t) for u in range(users)
          for t, i in enumerate(rng.integers(0, ITEMS, 5 + u % 4))]
  user_ids, item_ids, times = map(np.asarray, zip(*rows))
  return preprocess.prepare(formats.RawDataset(
      "synthetic", user_ids, item_ids, times.astype(np.float64),
      np.full(len(rows), np.nan, np.float32), {}, {}),
      DataConfig(name="synthetic", time_order="exact"))


def make_fixture(directory: pathlib.Path) -> tuple[pathlib.Path, preprocess.Prepared,
                                                      pathlib.Path]:
  """(HF directory of a tiny random LLaMA, the prepared data, teacher rationales.jsonl)."""
  prepared = distill_prepared()
  texts = [m["content"] for m in prompts.cot_messages(prepared.item_text[1:], PROMPT)]
  tokenizer = word_tokenizer(texts + ["system user assistant", rationale(0), rationale(1)] +
                             [f"item i{i}" for i in range(ITEMS)])
  model_dir = hf.save_hf(directory / "tiny", TINY_LLAMA, random_params(TINY_LLAMA), tokenizer)
  path = directory / "rationales.jsonl"
  with path.open("w") as f:
    for user, split, items in prompts.visible_histories(
        prepared, prompts.history_splits(PROMPT, "teacher")):
      last = int(prepared.item_ids[items[-1]][1:])
      f.write(json.dumps({"user_id": str(prepared.user_ids[user]), "split": split,
                          "prompt_hash": "-", "model": "synthetic", "history_len": len(items),
                          "text": rationale(last)}) + "\n")
  return model_dir, prepared, path


def tiny_config(model_dir, **changes) -> DistillConfig:
  """A distillation of the fixture's student that learns in 8 steps of 8 examples."""
  return dataclasses.replace(DistillConfig(
      checkpoint=str(model_dir), lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, steps=8,
      batch_size=8, lr=2e-2, warmup_steps=2, max_rationale_tokens=48, buckets=(256,),
      heldout_fraction=0.25, eval_every=4, log_every=1, checkpoint_every=2, dtype="float32",
      base_dtype="float32"), **changes)


def one_device():
  return parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])


# ---------------------------------------------------------------------------------------------
# Recommender data.


def prepared_from_sequences(seqs, num_items: int) -> preprocess.Prepared:
  """Prepared data of item sequences (ids 1..num_items), one per user."""
  return preprocess.Prepared(
      user_ids=np.array([f"u{u}" for u in range(len(seqs))]),
      item_ids=np.array([""] + [f"i{i}" for i in range(1, num_items + 1)]),
      item_text=("",) + tuple(f"item {i}" for i in range(1, num_items + 1)),
      item_meta=(ItemMeta(),) * (num_items + 1),
      seq_items=np.concatenate(seqs).astype(np.int32),
      seq_offsets=np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64),
      stats={})


# ---------------------------------------------------------------------------------------------
# Teacher requests for the OpenAI-compatible client.

KEY_ENV = "SLIM_JAX_TEST_TEACHER_KEY"


def synthetic_requests(n: int) -> list[rationales.Request]:
  """`n` distinct prompts, as the teacher stage would build them."""
  requests = []
  for user in range(n):
    history = [f"Movie {user}-{k} ({1980 + k}) | Genres: Drama" for k in range(1 + user % 7)]
    messages = tuple(prompts.cot_messages(history, PromptConfig()))
    requests.append(rationales.Request(user, f"u{user}", "valid", messages, len(history),
                                       prompt_tokens=sum(len(m["content"]) for m in messages) // 4))
  return requests


def client_config(url: str, **changes) -> TeacherConfig:
  """Short backoffs; the fake server's stalls (1.5 s) outlast the 1 s timeout. The key is read
  from KEY_ENV."""
  return dataclasses.replace(TeacherConfig(
      kind="openai", base_url=url, model="gpt-test", api_key_env=KEY_ENV, concurrency=8,
      timeout_s=1.0, max_retries=4, backoff_s=0.01, max_backoff_s=0.5), **changes)


# ---------------------------------------------------------------------------------------------
# Tiny BERT and sentence-transformers models.

MINILM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                          "special_tokens_map.json")


def padded(token_ids, length):
  """(ids, attention mask) [len(token_ids), length], right-padded with 0."""
  ids = np.zeros((len(token_ids), length), np.int32)
  mask = np.zeros((len(token_ids), length), np.int32)
  for row, tokens in enumerate(token_ids):
    ids[row, :len(tokens)] = tokens
    mask[row, :len(tokens)] = 1
  return ids, mask


def cosine_distance(a, b):
  return 1 - np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def tiny_torch_bert(hidden_act="gelu", vocab_size=99, seed=0):
  """A random BertModel whose weights are all O(0.1-1), so every parameter matters."""
  import torch  # here: only the modules that build a torch model pay for importing it
  config = transformers.BertConfig(
      vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=64, hidden_act=hidden_act,
      layer_norm_eps=1e-12)
  torch.manual_seed(seed)
  model = transformers.BertModel(config).eval()
  with torch.no_grad():
    for name, value in model.named_parameters():
      value.copy_(torch.randn_like(value) * 0.2 + (1.0 if "LayerNorm.weight" in name else 0.0))
  return model


def state_numpy(model):
  return {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}


def write_hf_dir(model, directory: pathlib.Path) -> pathlib.Path:
  """config.json + model.safetensors as save_pretrained writes them, through safetensors."""
  directory.mkdir(parents=True, exist_ok=True)
  model.config.to_json_file(directory / "config.json")
  safetensors.numpy.save_file(state_numpy(model), directory / "model.safetensors")
  return directory


def write_sentence_transformers_dir(directory: pathlib.Path, mode="mean", normalize=True,
                                    max_seq_length=16, seed=0) -> pathlib.Path:
  """A tiny random sentence-transformers model using all-MiniLM-L6-v2's tokenizer."""
  minilm = assets.path("minilm")
  write_hf_dir(tiny_torch_bert(vocab_size=30522, seed=seed), directory)
  for name in MINILM_TOKENIZER_FILES:
    shutil.copy(minilm / name, directory / name)
  modules = [{"idx": 0, "name": "0", "path": "",
              "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling",
              "type": "sentence_transformers.models.Pooling"}]
  if normalize:
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
  (directory / "modules.json").write_text(json.dumps(modules))
  (directory / "sentence_bert_config.json").write_text(
      json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
  (directory / "1_Pooling").mkdir()
  keys = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
          "max": "pooling_mode_max_tokens", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens"}
  pooling = {"word_embedding_dimension": 32, **{key: m == mode for m, key in keys.items()}}
  (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
  return directory


def encode_ours(model: bert.SentenceEncoder, texts, length=None):
  """(our pooled embeddings of `texts`, their token ids), padded to `length` (default: longest)."""
  token_ids = model.tokenize(texts)
  ids, mask = padded(token_ids, length or max(len(t) for t in token_ids))
  apply = jax.jit(bert.apply, static_argnums=(3, 4))
  return np.asarray(apply(model.params, ids, mask, model.config, model.pooling)), token_ids


# ---------------------------------------------------------------------------------------------
# The tiny pipeline of launch.py (test_pipeline, test_multiprocess), and what launch.py logs.

ROOT = pathlib.Path(__file__).parent.parent  # the repository, where launch.py lives
GENRES = ("Drama", "Comedy", "Action")
# An absl log line at INFO (or DEBUG): "I1207 12:19:45.327948 140238750276480 pipeline.py:240] "
_INFO_LINE = re.compile(r"^I\d{4} [\d:.]+ +\d+ ([^:\s]+):\d+\] ", re.MULTILINE)


def third_party_info(log: str) -> list[str]:
  """The files named by `log`'s INFO lines that are no file of ours (slim_jax's modules,
  launch.py): what a run must not print below --verbosity=1. By file name, as absl's prefix
  names them."""
  ours = {path.name for path in (ROOT / "slim_jax").rglob("*.py")} | {"launch.py"}
  return [name for name in _INFO_LINE.findall(log) if name not in ours]


def write_recbole(directory: pathlib.Path, users: int = 16, items: int = 12) -> pathlib.Path:
  """tiny.inter and tiny.item in RecBole's atomic format: users favour one genre."""
  rng = np.random.default_rng(0)
  directory.mkdir(parents=True)
  lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
  for user in range(users):
    liked = [i for i in range(items) if i % len(GENRES) == user % len(GENRES)]
    for t, item in enumerate(rng.choice(liked + list(range(items)), 6 + user % 4)):
      lines.append(f"{user}\t{item}\t4\t{1000 * user + t}")
  (directory / "tiny.inter").write_text("\n".join(lines) + "\n")
  items_text = ["item_id:token\tmovie_title:token_seq\tclass:token_seq"]
  items_text += [f"{i}\tItem i{i}\t{GENRES[i % len(GENRES)]}" for i in range(items)]
  (directory / "tiny.item").write_text("\n".join(items_text) + "\n")
  return directory


CONFIG_FILE = '''
from slim_jax.config import Config, DataConfig
from slim_jax.embed import EncoderConfig
from slim_jax.models.recommender import RecConfig
from slim_jax.prompts import PromptConfig
from slim_jax.student import StudentConfig
from slim_jax.teacher import TeacherConfig
from slim_jax.train.distill import DistillConfig


def get_config():
  return Config(
      name="tiny", data=DataConfig(name="tiny", path={data!r}),
      prompt=PromptConfig(domain="generic", max_prompt_tokens=192, exemplar=False),
      teacher=TeacherConfig(kind="openai", base_url={url!r}, api_key_env="", max_tokens=64,
                            concurrency=2, backoff_s=0.01),
      distill=DistillConfig(checkpoint={model!r}, lora_rank=4, lora_alpha=8.0, steps=4,
                            batch_size=8, lr=2e-2, warmup_steps=1, max_rationale_tokens=48,
                            buckets=(256,), heldout_fraction=0.25, eval_every=2,
                            checkpoint_every=2, dtype="float32", base_dtype="float32"),
      student=StudentConfig(max_tokens=8, batch_size=8, dtype="float32", temperature=1.0,
                            keep_rejected=True),
      encoder=EncoderConfig(kind="minilm", batch_size=8),
      rec=RecConfig(backbone="gru4rec", hidden=16, max_len=10, gru_hidden=16, batch=16,
                    eval_batch=16, epochs=6, eval_every=2, sampled_negatives=5))
'''


def tiny_pipeline(root: pathlib.Path, teacher_url: str) -> pathlib.Path:
  """A config file for launch.py over the tiny dataset, the OpenAI-compatible teacher at
  `teacher_url` and a tiny random student on disk; returns the config's path."""
  data = write_recbole(root / "tiny")
  words = ["system", "user", "assistant", *"Step 1 2 3 The liked and lately More of what "
           "items have in common Something like Prompt Item Genres . : |".split(),
           *[f"i{i}" for i in range(12)], *GENRES]
  # Filler words up to the model's vocabulary (3 ids are special tokens), so that every token
  # a random student writes decodes to text.
  words += [f"w{i:03d}" for i in range(TINY_LLAMA.vocab_size - 3 - len(set(words)))]
  model = hf.save_hf(root / "student", TINY_LLAMA, random_params(TINY_LLAMA),
                     word_tokenizer([" ".join(words)]))
  config = root / "tiny_config.py"
  config.write_text(CONFIG_FILE.format(data=str(data), url=teacher_url, model=str(model)))
  return config


# Not fetch or convert: the tiny pipeline converts nothing, and its assets are fetched on demand.
STAGES = ("prepare", "teacher", "distill", "generate", "encode", "train", "report")


def launch_args(config: pathlib.Path, workdir: pathlib.Path, stages=STAGES,
                *overrides) -> list[str]:
  """The command line of launch.py running the tiny pipeline's `stages` into `workdir`."""
  return [sys.executable, str(ROOT / "launch.py"), f"--config={config}", f"--workdir={workdir}",
          f"--stages={','.join(stages)}", *overrides]


@dataclasses.dataclass(frozen=True)
class TinyRun:
  """The tiny pipeline, every stage run once through launch.py: `config` is its config file,
  `server` the OpenAI-compatible teacher (no faults) that it calls, `workdir` its complete work
  directory, `log` what it logged and `requests` the requests it sent, by prompt."""
  config: pathlib.Path
  server: fake_openai_server.FakeOpenAI
  workdir: pathlib.Path
  log: str
  requests: collections.Counter


@functools.cache
def tiny_run() -> TinyRun:
  """The tiny pipeline's run, once per test process: the modules that test it (test_pipeline,
  test_multiprocess) start from it instead of running it again each. Its work directory is
  theirs to read; a test that runs stages in a work directory copies it first."""
  root = pathlib.Path(tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir()))
  server = fake_openai_server.FakeOpenAI(fault_rate=0.0).__enter__()
  atexit.register(server.__exit__, None, None, None)
  config = tiny_pipeline(root, server.url)
  result = subprocess.run(launch_args(config, root / "whole"), cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
  if result.returncode:
    raise RuntimeError(f"the tiny pipeline failed:\n{result.stderr[-4000:]}")
  return TinyRun(config, server, root / "whole", result.stderr,
                 collections.Counter(server.requests))


class TinyPipelineTest(absltest.TestCase):
  """Test cases over the tiny pipeline: `cls.tiny` is its shared run (tiny_run), `cls.root` a
  fresh directory for the work directories of the class's own runs."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tiny = tiny_run()
    cls.root = pathlib.Path(tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir()))
