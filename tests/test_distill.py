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

from slim_jax import parallel
from slim_jax.checkpoints import hf
from slim_jax.data import loader
from slim_jax.models import llama
from slim_jax.models.llama import Llama
from slim_jax.train import distill
from slim_jax.train.distill import DistillConfig
from tests.fixtures import (STUDENT_PROMPT, TINY_LLAMA, make_fixture, one_device, random_params,
                            tiny_config)

REPO = pathlib.Path(__file__).resolve().parent.parent


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
      summary = distill.run_distill(tiny_config(self.model_dir, **changes), STUDENT_PROMPT,
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
    ours = np.asarray(Llama(TINY_LLAMA, lora_config).apply(
        {"params": base, "lora": adapters}, jnp.asarray(tokens))[0])
    theirs = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(self.model_dir), out / "adapter").eval()
    with torch.no_grad():
      expected = theirs(input_ids=torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, expected, atol=2e-4)
    without = np.asarray(Llama(TINY_LLAMA).apply({"params": base}, jnp.asarray(tokens))[0])
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
        from tests import fixtures as t
        from slim_jax.train import distill
        distill.run_distill(t.tiny_config({str(self.model_dir)!r}), t.STUDENT_PROMPT,
                            t.distill_prepared(), {str(self.rationales)!r}, {str(out)!r},
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
      summary = distill.run_distill(tiny_config(self.model_dir), STUDENT_PROMPT, self.prepared,
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
      distill.run_distill(tiny_config(self.model_dir, steps=12, lr=float("inf")), STUDENT_PROMPT,
                          self.prepared, self.rationales, out, one_device())
    self.assertEqual(ocp.CheckpointManager(out / "checkpoints").latest_step(), 8)

  def test_packed_run_learns_from_rows_of_several_examples(self):
    expected, _ = self.distill("single", one_device())
    summary, _ = self.distill("packed", one_device(), pack=True, buckets=(256, 512),
                              batch_size=4)
    # evaluation is not packed: the same base model, the same held-out batches
    self.assertAlmostEqual(summary["heldout_loss_before"], expected["heldout_loss_before"],
                           places=6)
    self.assertLess(summary["heldout_loss"], 0.75 * summary["heldout_loss_before"])
    # rows of 512 hold on average more tokens than the longest example (192 + 48 = 240)
    self.assertGreater(summary["trained_tokens"], 8 * 4 * 240)


class TrainStepTest(absltest.TestCase):

  def test_bf16_step_trains_fp32_adapters_only(self):
    config = dataclasses.replace(TINY_LLAMA, dtype="bfloat16")
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

  def test_packed_step_equals_the_padded_step_on_the_same_examples(self):
    """Packing changes the layout, not the objective: a step over packed rows reports the loss
    (mean over rationale tokens) and gradient norm of the same examples padded one per row, up
    to fp32 summation order. Read as one sequence, the packed rows give another loss."""
    mesh = one_device()
    base = parallel.shard_params(random_params(TINY_LLAMA), llama.partition_rules(TINY_LLAMA),
                                 mesh)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 200, n) for n in (30, 12, 21, 7, 40, 16, 25, 9)]
    targets = [rng.integers(3, 200, n) for n in (6, 14, 3, 20, 8, 11, 5, 17)]
    packs = loader.pack_examples([len(p) + len(t) for p, t in zip(prompts, targets)], 64)
    self.assertLen(packs, 5)
    batches = {False: loader.lm_batch(prompts, targets, (64,), pad_id=2),
               True: loader.packed_lm_batch(prompts, targets, packs, 64, pad_id=2)}
    metrics = {}
    for pack, batch in batches.items():
      cfg = DistillConfig(lora_rank=4, lora_dropout=0.0, warmup_steps=0, steps=1,
                          dtype="float32", base_dtype="float32", pack=pack)
      _, state, _, step = distill.build_step(TINY_LLAMA, cfg, base, mesh)
      with jax.set_mesh(mesh):
        metrics[pack] = jax.device_get(step(base, state, parallel.global_batch(batch, mesh))[1])
    self.assertEqual(metrics[True]["tokens"], metrics[False]["tokens"])
    np.testing.assert_allclose(metrics[True]["loss"], metrics[False]["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics[True]["grad_norm"], metrics[False]["grad_norm"],
                               rtol=1e-5)
    with jax.set_mesh(mesh):
      total, count = distill.rationale_nll(Llama(TINY_LLAMA), {"params": base}, batches[True])
    self.assertGreater(abs(float(total / count) - metrics[False]["loss"]), 1e-3)


if __name__ == "__main__":
  absltest.main()
