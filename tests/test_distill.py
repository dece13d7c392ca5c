"""Distillation on a tiny random LLaMA: it learns, trains only the adapters, shards, resumes after
a kill, stops on non-finite updates keeping the last good checkpoint, and exports a PEFT adapter
that Hugging Face peft loads with the same logits."""

import dataclasses
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
from absl.testing import absltest

from slim_jax import parallel, prompts
from slim_jax.checkpoints import hf
from slim_jax.config import DataConfig
from slim_jax.data import formats, loader, preprocess
from slim_jax.models import llama
from slim_jax.models.llama import Llama
from slim_jax.prompts import PromptConfig
from slim_jax.train import distill
from slim_jax.train.distill import DistillConfig

REPO = pathlib.Path(__file__).resolve().parent.parent
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONFIG = dataclasses.replace(llama.PRESETS["tiny"], vocab_size=256, max_position_embeddings=512)
PROMPT = PromptConfig(domain="generic", max_prompt_tokens=192)
ITEMS = 12


def random_params(config, seed: int = 0):
  """Random LLaMA weights drawn on the host: no compilation per parameter shape."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (1 + 0.1 * rng.standard_normal(s.shape) if len(s.shape) == 1 else
                                 0.1 * rng.standard_normal(s.shape)).astype(np.float32),
                      hf.param_shapes(config))


def word_tokenizer(texts):
  """A word-level tokenizer over `texts` with ChatML's specials: prompts of ~150 tokens, not ~700
  bytes, so a test step is cheap."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  split = pre_tokenizers.Whitespace()
  words = sorted({w for text in texts for w, _ in split.pre_tokenize_str(text)})
  vocab = {w: i for i, w in enumerate(["[UNK]", "<|im_start|>", "<|im_end|>"] + words)}
  core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  core.pre_tokenizer = split
  return PreTrainedTokenizerFast(tokenizer_object=core, chat_template=CHATML, unk_token="[UNK]",
                                 eos_token="<|im_end|>", pad_token="<|im_end|>",
                                 additional_special_tokens=["<|im_start|>"])


def rationale(last_item: int) -> str:
  """The synthetic teacher: a fixed three-step template whose words follow the last item seen."""
  kind = ("drama", "comedy")[last_item % 2]
  return (f"Step 1: the user likes {kind} . Step 2: more {kind} . "
          f"Step 3: item i{(last_item + 1) % ITEMS} and item i{(last_item + 2) % ITEMS} .")


def synthetic_prepared(users: int = 24, seed: int = 0) -> preprocess.Prepared:
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
  prepared = synthetic_prepared()
  texts = [m["content"] for m in prompts.cot_messages(prepared.item_text[1:], PROMPT)]
  tokenizer = word_tokenizer(texts + ["system user assistant", rationale(0), rationale(1)] +
                             [f"item i{i}" for i in range(ITEMS)])
  model_dir = hf.save_hf(directory / "tiny", CONFIG, random_params(CONFIG), tokenizer)
  path = directory / "rationales.jsonl"
  with path.open("w") as f:
    for user, split, items in prompts.visible_histories(prepared, PROMPT.history):
      last = int(prepared.item_ids[items[-1]][1:])
      f.write(json.dumps({"user": user, "user_id": str(prepared.user_ids[user]), "split": split,
                          "prompt_hash": "-", "model": "synthetic", "history_len": len(items),
                          "text": rationale(last)}) + "\n")
  return model_dir, prepared, path


def tiny_config(model_dir, **changes) -> DistillConfig:
  return dataclasses.replace(DistillConfig(
      checkpoint=str(model_dir), lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, steps=8,
      batch_size=8, lr=2e-2, warmup_steps=2, max_rationale_tokens=48, buckets=(256,),
      heldout_fraction=0.25, eval_every=4, log_every=1, checkpoint_every=2, dtype="float32",
      base_dtype="float32"), **changes)


def one_device():
  return parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])


def adapter_weights(out_dir) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(pathlib.Path(out_dir) / "adapter" /
                                     "adapter_model.safetensors")


class DistillTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = pathlib.Path(tempfile.mkdtemp())
    cls.model_dir, cls.prepared, cls.rationales = make_fixture(cls.root)
    cls.runs = {}

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root)
    super().tearDownClass()

  def distill(self, name: str, mesh, **changes) -> tuple[dict, pathlib.Path]:
    """(summary, out_dir) of a run, shared between tests."""
    if name not in self.runs:
      out = self.root / name
      summary = distill.run_distill(tiny_config(self.model_dir, **changes), PROMPT,
                                    self.prepared, self.rationales, out, mesh)
      self.runs[name] = summary, out
    return self.runs[name]

  def test_heldout_loss_falls_and_adapter_loads_in_peft_with_equal_logits(self):
    import peft
    import torch
    import transformers
    summary, out = self.distill("single", one_device())
    self.assertEqual((summary["train_examples"], summary["heldout_examples"]), (18, 6))
    self.assertLess(summary["heldout_loss"], 0.75 * summary["heldout_loss_before"])
    self.assertLess(summary["heldout_perplexity"], summary["heldout_perplexity_before"] / 4)
    self.assertGreater(summary["tokens_per_s"], 0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    self.assertEqual([r["step"] for r in rows if "heldout/loss" in r], [4, 8])

    from slim_jax.checkpoints import peft as peft_io
    adapters, lora_config = peft_io.load_peft(out / "adapter")
    tokens = np.random.default_rng(0).integers(3, 100, (2, 24))
    base = hf.load_params(self.model_dir)
    ours = np.asarray(Llama(CONFIG, lora_config).apply(
        {"params": base, "lora": adapters}, jnp.asarray(tokens))[0])
    theirs = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(self.model_dir), out / "adapter").eval()
    with torch.no_grad():
      expected = theirs(input_ids=torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, expected, atol=2e-4)
    without = np.asarray(Llama(CONFIG).apply({"params": base}, jnp.asarray(tokens))[0])
    self.assertGreater(np.abs(ours - without).max(), 0.1)  # the adapter does change the model

  def test_sharded_with_accumulation_and_remat_matches_one_device(self):
    expected, expected_out = self.distill("single", one_device())
    mesh = parallel.make_mesh({"fsdp": 2, "tensor": 4})
    summary, out = self.distill("sharded", mesh, grad_accum=2, remat_policy="nothing_saveable")
    self.assertAlmostEqual(summary["heldout_loss"], expected["heldout_loss"], delta=1e-4)
    for name, value in adapter_weights(expected_out).items():
      np.testing.assert_allclose(adapter_weights(out)[name], value, atol=2e-4, err_msg=name)

  def test_resume_after_kill_equals_uninterrupted_run(self):
    expected, expected_out = self.distill("single", one_device())
    out = self.root / "killed"
    child = textwrap.dedent(f"""
        from tests import test_distill as t
        from slim_jax.train import distill
        distill.run_distill(t.tiny_config({str(self.model_dir)!r}), t.PROMPT,
                            t.synthetic_prepared(), {str(self.rationales)!r}, {str(out)!r},
                            t.one_device())
        """)
    log = self.root / "killed.log"
    with log.open("w") as stderr:
      process = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, stderr=stderr)
      finished = lambda: [p for p in (out / "checkpoints").glob("*") if p.name.isdigit()]
      while process.poll() is None and not finished():
        time.sleep(0.01)
      process.send_signal(signal.SIGKILL)
      process.wait()
    self.assertEqual(process.returncode, -signal.SIGKILL, log.read_text())
    killed_at = max(int(p.name) for p in finished())
    self.assertLess(killed_at, 8)

    calls = []
    original = loader.BatchIterator.__next__
    with absltest.mock.patch.object(loader.BatchIterator, "__next__",
                                    lambda it: calls.append(1) or original(it)):
      summary = distill.run_distill(tiny_config(self.model_dir), PROMPT, self.prepared,
                                    self.rationales, out, one_device())
    self.assertLen(calls, 8 - killed_at)  # resumed, not restarted
    self.assertEqual(summary["heldout_loss"], expected["heldout_loss"])
    for name, value in adapter_weights(expected_out).items():
      np.testing.assert_allclose(adapter_weights(out)[name], value, rtol=1e-6, err_msg=name)

  def test_non_finite_update_stops_and_keeps_the_last_good_checkpoint(self):
    _, finished = self.distill("single", one_device())
    out = self.root / "poisoned"
    shutil.copytree(finished, out)
    with self.assertRaisesRegex(FloatingPointError,
                                r"non-finite .* steps 9\.\.9: .*lora_norm.* last good checkpoint "
                                r"is step 8"):
      distill.run_distill(tiny_config(self.model_dir, steps=12, lr=float("inf")), PROMPT,
                          self.prepared, self.rationales, out, one_device())
    self.assertEqual(ocp.CheckpointManager(out / "checkpoints").latest_step(), 8)

  def test_packing_is_refused_until_attention_is_segment_aware(self):
    with self.assertRaisesRegex(ValueError, "distill.pack=True is not supported yet"):
      distill.run_distill(tiny_config(self.model_dir, pack=True), PROMPT, self.prepared,
                          self.rationales, self.root / "packed", one_device())


class TrainStepTest(absltest.TestCase):

  def test_bf16_step_trains_fp32_adapters_only(self):
    config = dataclasses.replace(CONFIG, dtype="bfloat16")
    cfg = DistillConfig(lora_rank=4, lr=1e-2, warmup_steps=0, steps=2, dtype="bfloat16",
                        lora_targets=("q_proj", "down_proj"))
    mesh = one_device()
    base = parallel.shard_params(random_params(config), llama.partition_rules(config), mesh)
    before = jax.device_get(base)
    _, state, _, step = distill.build_step(config, cfg, base, mesh)
    rng = np.random.default_rng(0)
    batch = loader.lm_batch([rng.integers(3, 200, 20 + k) for k in range(8)],
                            [rng.integers(3, 200, 6) for _ in range(8)], (48,), pad_id=2)
    with jax.set_mesh(mesh):
      for _ in range(2):
        state, metrics = step(base, state, parallel.global_batch(batch, mesh))
    self.assertTrue(np.isfinite(float(metrics["loss"])))
    self.assertEqual(float(metrics["tokens"]), sum(20 + k + 6 for k in range(8)))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(base), before)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    self.assertEqual({parallel.path_str(p).rsplit("/", 1)[-1] for p, x in leaves if x.ndim == 2},
                     {"lora_a", "lora_b"})
    self.assertEqual({x.dtype for _, x in leaves if x.ndim == 2}, {jnp.dtype("float32")})
    self.assertTrue(np.any(jax.device_get(state.lora["layers_1"]["mlp"]["down_proj"]["lora_b"])))


if __name__ == "__main__":
  absltest.main()
