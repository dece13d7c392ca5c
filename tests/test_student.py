"""Student rationales: a rationale for every user from the merged student, sharded, resumable through
the teacher's cache without generating anything twice, equal to the unmerged adapter's output."""

import collections
import dataclasses
import pathlib

import jax
import numpy as np
from absl.testing import absltest

from slim_jax import local_generation, parallel, rationales, sampler, student
from slim_jax.checkpoints import hf, peft
from slim_jax.checkpoints.tokenizer import load_tokenizer
from slim_jax.models import lora as lora_lib
from slim_jax.models.llama import Llama
from slim_jax.models.lora import LoraConfig
from slim_jax.student import StudentConfig
from tests.fixtures import STUDENT_PROMPT, TINY_LLAMA, make_fixture


def random_adapter(model_dir: pathlib.Path, directory: pathlib.Path) -> None:
  """A PEFT adapter on `model_dir` with non-zero B, so that it changes what the model writes."""
  config = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
  adapters = lora_lib.init_lora(Llama(TINY_LLAMA, config), jax.random.key(0))
  rng = np.random.default_rng(1)
  adapters = jax.tree.map(lambda x: np.asarray(x) + 0.3 * rng.standard_normal(x.shape), adapters)
  peft.save_peft(directory, adapters, config, base_model=str(model_dir))


class StudentTest(absltest.TestCase):

  def test_every_user_once_resumably_and_as_the_unmerged_adapter_writes(self):
    root = pathlib.Path(self.create_tempdir().full_path)
    model_dir, prepared, _ = make_fixture(root)
    random_adapter(model_dir, root / "adapter")
    # A random student's answers are all rejected; kept, every user still gets one.
    cfg = StudentConfig(max_tokens=8, batch_size=8, dtype="float32", temperature=0.0,
                        keep_rejected=True)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    out = root / "student"

    first = student.run_student(dataclasses.replace(cfg, max_users=5), STUDENT_PROMPT, prepared,
                                root / "adapter", out, mesh)
    self.assertEqual((first["requests"], first["generated"], first["ok"]), (5, 5, 5))
    self.assertGreater(first["tokens_per_s"], 0)
    cache = (out / "cache.jsonl").read_text()
    summary = student.run_student(cfg, STUDENT_PROMPT, prepared, root / "adapter", out, mesh)
    users = prepared.num_users
    self.assertEqual((summary["requests"], summary["generated"], summary["ok"]),
                     (users, users - 5, users))
    self.assertTrue((out / "cache.jsonl").read_text().startswith(cache))
    records = rationales.read_cache(out / "cache.jsonl")
    self.assertEqual(collections.Counter(map(rationales.cache_key, records)).most_common(1)[0][1],
                     1)
    self.assertEqual(student.run_student(cfg, STUDENT_PROMPT, prepared, root / "adapter", out,
                                         mesh)["generated"], 0)
    lines = (out / "rationales.jsonl").read_text().splitlines()
    self.assertLen(lines, users)
    self.assertEqual(summary["kept_rejected"], users)
    self.assertEqual(sum(summary["rejections"].values()), users)

    # The merged, sharded student writes what the unmerged adapter writes on one device.
    adapters, lora_config = peft.load_peft(root / "adapter")
    tokenizer = load_tokenizer(model_dir)
    pcfg = STUDENT_PROMPT
    requests = rationales.build_requests(
        prepared, pcfg, lambda m: len(rationales.chat_ids(tokenizer, m)), max_users=8, local=True)
    sampling = local_generation.sampling_config(local_generation.Decoding.of(cfg), tokenizer,
                                                pcfg)
    texts = lambda model, variables: [(r.prefill + tokenizer.decode(i, skip_special_tokens=True))
                                      .strip() for r, i in zip(requests, sampler.generate_ids(
        model, variables, [rationales.chat_ids(tokenizer, r.messages, r.prefill) for r in requests],
        jax.random.key(0), sampling, [tokenizer.eos_token_id], tokenizer.pad_token_id))]
    base = hf.load_params(model_dir)
    written = [{r["user_id"]: r["text"] for r in records}[q.user_id] for q in requests]
    self.assertEqual(written, texts(Llama(TINY_LLAMA, lora_config),
                                    {"params": base, "lora": adapters}))
    self.assertNotEqual(written, texts(Llama(TINY_LLAMA), {"params": base}))  # the adapter matters

    # Pointed at the base checkpoint, the same stage writes the undistilled baseline.
    undistilled = student.run_student(dataclasses.replace(cfg, max_users=8), STUDENT_PROMPT,
                                      prepared, model_dir, root / "base", mesh)
    self.assertEqual(undistilled["model"], f"base:{model_dir.name}")
    base_records = {r["user_id"]: r["text"]
                    for r in rationales.read_cache(root / "base" / "cache.jsonl")}
    self.assertEqual([base_records[q.user_id] for q in requests],
                     texts(Llama(TINY_LLAMA), {"params": base}))

  def test_another_adapter_is_another_cache_model(self):
    root = pathlib.Path(self.create_tempdir().full_path)
    config = LoraConfig(rank=2, targets=("q_proj",))
    for name, value in (("a", 1.0), ("b", 2.0)):
      adapter = {"lora_a": np.full((4, 2), value), "lora_b": np.zeros((2, 4))}
      peft.save_peft(root / name, {"layers_0": {"self_attn": {"q_proj": adapter}}}, config)
    self.assertRegex(student.model_label(root / "a"), r"^student:[0-9a-f]{12}$")
    self.assertNotEqual(student.model_label(root / "a"), student.model_label(root / "b"))


if __name__ == "__main__":
  absltest.main()
