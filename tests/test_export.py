"""The export stage: the student's base with its LoRA merged, as a GGUF file that our reader,
transformers' GGUF loader and the sampler's command line load with the merged model's logits;
every key it writes for SmolLM2 is the embedded GGUF's own; a model, adapter or tokenizer it
cannot write is refused before anything is written, and an interrupted export leaves no file.

The student is a tiny random LLaMA with SmolLM2's real tokenizer (49,152 byte-level BPE tokens,
its merges, control tokens and chat template), so the tokenizer metadata is the real thing."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import gguf
import jax
import numpy as np
import peft
import torch
import transformers
from absl.testing import absltest, parameterized

from slim_jax import (assets, checkpoints, export, layout, multihost, pipeline, rationales,
                      sampler, student)
from slim_jax.checkpoints import gguf as gguf_io
from slim_jax.checkpoints import hf
from slim_jax.checkpoints import peft as peft_io
from slim_jax.checkpoints.tokenizer import gguf_fields, load_tokenizer
from slim_jax.config import Config, apply_overrides
from slim_jax.models import lora as lora_lib
from slim_jax.models.llama import Llama, RopeScaling
from slim_jax.models.lora import LoraConfig
from tests import llama_reference as ref
from tests.fixtures import ROOT, TINY_LLAMA, one_device, random_params, word_tokenizer

CONFIG = dataclasses.replace(TINY_LLAMA, vocab_size=49152)  # GQA, untied
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0,
                  targets=("down_proj", "k_proj", "q_proj", "v_proj"))  # K and Q: permuted
TEXT = "Recommend a movie like Toy Story, from 1995."


def write_student(root: pathlib.Path, config=CONFIG, lora: LoraConfig = LORA, seed: int = 0):
  """(base HF directory, PEFT adapter directory): random weights, SmolLM2's tokenizer, and an
  adapter whose B is far from zero, so that merging it changes every adapted tensor."""
  base = hf.save_hf(root / "base", config, random_params(config, seed),
                    load_tokenizer(assets.path("smollm2")))
  adapters = lora_lib.init_lora(Llama(config, lora), jax.random.key(seed))
  rng = np.random.default_rng(seed + 1)
  adapters = jax.tree.map(lambda x: np.asarray(x) + 0.3 * rng.standard_normal(x.shape), adapters)
  return base, peft_io.save_peft(root / "adapter", adapters, lora, base_model=str(base))


def prompt_ids(tokenizer) -> np.ndarray:
  return np.array([rationales.chat_ids(tokenizer, [{"role": "user", "content": TEXT}])])


class ExportTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = pathlib.Path(absltest.get_default_test_tmpdir()) / "export"
    cls.base, cls.adapter = write_student(cls.root)
    _, cls.merged, cls.tokenizer = student.load_student(cls.adapter, one_device(), "float32")
    cls.ids = prompt_ids(cls.tokenizer)
    cls.logits = ref.jax_logits(CONFIG, cls.merged, cls.ids)
    cls.files = {dtype: cls.root / "export" / f"student-{dtype}.gguf" for dtype in
                 gguf_io.FILE_TYPES}
    cls.summaries = {dtype: export.export_gguf(cls.adapter, path, dtype, "student")
                     for dtype, path in cls.files.items()}

  def test_f32_loads_in_our_reader_with_the_merged_logits(self):
    config, params, tokenizer = checkpoints.load(self.files["f32"])
    self.assertEqual(config, CONFIG)
    ours = ref.jax_logits(config, {"params": params}, self.ids)
    np.testing.assert_allclose(ours, self.logits, atol=1e-5, rtol=0)
    self.assertEqual(tokenizer(TEXT)["input_ids"], self.tokenizer(TEXT)["input_ids"])
    self.assertEqual(tokenizer.apply_chat_template([{"role": "user", "content": TEXT}],
                                                   tokenize=False),
                     self.tokenizer.apply_chat_template([{"role": "user", "content": TEXT}],
                                                        tokenize=False))
    summary = self.summaries["f32"]
    self.assertEqual((summary["tensors"], summary["adapted_tensors"]), (21, 8))
    # The adapter moved the logits: an export of the base alone would not pass the bound above.
    base = ref.jax_logits(CONFIG, {"params": hf.load_params(self.base)}, self.ids)
    self.assertGreater(np.abs(base - self.logits).max(), 1.0)

  # The file holds the merged weights rounded through its type, and nothing else: the logits of
  # the merged model with every matrix so rounded here agree to 1e-5. From the merged fp32 logits
  # (about ±4 on this random model, which amplifies weight noise) they stand 0.036 (f16) and 0.81
  # (q8_0) apart; on the quick preset's distilled SmolLM2-135M, 0.037 and 1.49 over logits up to
  # 38, the argmax the same at 37 and 35 of a chat prompt's 37 positions.
  @parameterized.parameters(("f16", gguf.GGMLQuantizationType.F16, 0.1),
                            ("q8_0", gguf.GGMLQuantizationType.Q8_0, 1.5))
  def test_smaller_types_hold_the_merged_weights_rounded(self, dtype, kind, atol):
    config, params, _ = checkpoints.load(self.files[dtype])
    ours = ref.jax_logits(config, {"params": params}, self.ids)
    tensors = hf.params_to_hf(self.merged["params"], CONFIG)
    for name, weight in tensors.items():
      if weight.ndim == 2:  # blocks of 32 along each row [out, in]
        tensors[name] = (weight.astype(np.float16).astype(np.float32) if dtype == "f16" else
                         gguf.quants.dequantize(gguf.quants.quantize(weight, kind), kind))
    rounded = hf.params_from_reader(lambda name, index: tensors[name][index], CONFIG)
    np.testing.assert_allclose(ours, ref.jax_logits(CONFIG, {"params": rounded}, self.ids),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours, self.logits, atol=atol, rtol=0)
    reader = gguf.GGUFReader(self.files[dtype])
    types = {t.name: t.tensor_type for t in reader.tensors}
    self.assertEqual(types["blk.0.attn_norm.weight"], gguf.GGMLQuantizationType.F32)
    self.assertEqual(types["blk.1.attn_k.weight"], kind)
    self.assertEqual(types["output.weight"], kind)
    self.assertEqual(reader.fields["general.file_type"].contents(),
                     int(gguf_io.FILE_TYPES[dtype][1]))
    self.assertLess(self.files[dtype].stat().st_size, self.files["f32"].stat().st_size * 0.6)

  def test_transformers_gguf_loader_matches_peft_on_the_base(self):
    path = self.files["f32"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    reference = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(self.base, dtype=torch.float32),
        self.adapter).eval()
    np.testing.assert_allclose(ref.torch_logits(theirs, self.ids),
                               ref.torch_logits(reference, self.ids), atol=1e-4, rtol=0)
    greedy = lambda model: model.generate(
        torch.from_numpy(self.ids), attention_mask=torch.ones(self.ids.shape, dtype=torch.long),
        max_new_tokens=12, do_sample=False, pad_token_id=2)[0].tolist()
    self.assertEqual(greedy(theirs), greedy(reference))
    self.assertFalse(theirs.config.tie_word_embeddings)

  def test_the_sampler_command_line_serves_the_export(self):
    result = subprocess.run(
        [sys.executable, "-m", "slim_jax.sampler", f"--checkpoint={self.files['f32']}",
         f"--prompt={TEXT}", "--max_new_tokens=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    (answer,) = sampler.generate_text(
        Llama(CONFIG), self.merged, self.tokenizer, [sampler.chat_prompt(self.tokenizer, TEXT)],
        jax.random.key(0), sampler.SamplingConfig(8))
    self.assertEqual(result.stdout, f">>> {TEXT}\n{answer.strip()}\n\n")

  def test_every_key_written_for_smollm2_is_the_embedded_files_own(self):
    embedded = gguf_io.read_metadata(assets.path("smollm2"))
    config = gguf_io.config_from_metadata(embedded, {"token_embd.weight"}, "embedded")
    written = {**gguf_io.llama_metadata(config, "x", "f16"),
               **gguf_fields(load_tokenizer(assets.path("smollm2")), config.vocab_size, "x")}
    mine = {"general.name", "general.file_type", "tokenizer.ggml.add_eos_token"}
    for key in written.keys() - mine:  # reals as the file holds them: float32
      value = np.float32(written[key]) if isinstance(written[key], float) else written[key]
      self.assertEqual(value, embedded[key], key)
    self.assertEqual(written["tokenizer.ggml.pre"], "smollm")
    self.assertFalse(written["tokenizer.ggml.add_eos_token"])

  def test_written_q_and_k_rows_are_llama_cpps_permutation(self):
    reader = gguf.GGUFReader(self.files["f32"])
    stored = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist())))
              for t in reader.tensors}
    merged = hf.params_to_hf(self.merged["params"], CONFIG)
    # convert_hf_to_gguf.py's LlamaModel.permute, written out
    permute = lambda w, heads: w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]
                                         ).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(
        stored["blk.1.attn_q.weight"],
        permute(merged["model.layers.1.self_attn.q_proj.weight"], CONFIG.num_heads))
    np.testing.assert_array_equal(
        stored["blk.1.attn_k.weight"],
        permute(merged["model.layers.1.self_attn.k_proj.weight"], CONFIG.num_kv_heads))
    np.testing.assert_array_equal(stored["blk.1.attn_v.weight"],
                                  merged["model.layers.1.self_attn.v_proj.weight"])


class RefusalTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = pathlib.Path(self.create_tempdir().full_path)
    self.out = self.root / "export" / "student.gguf"

  def assert_refused(self, checkpoint, message: str):
    with self.assertRaisesRegex(ValueError, message):
      export.export_gguf(checkpoint, self.out, "f16")
    self.assertFalse(self.out.parent.exists() and any(self.out.parent.iterdir()))

  def test_an_architecture_the_writer_does_not_know(self):
    base, adapter = write_student(self.root)
    raw = json.loads((base / hf.CONFIG).read_text())
    (base / hf.CONFIG).write_text(json.dumps({**raw, "model_type": "mistral"}))
    self.assert_refused(adapter, r"base/config.json: model_type='mistral', expected 'llama'")

  def test_a_base_that_is_no_hugging_face_directory(self):
    with self.assertRaisesRegex(FileNotFoundError, r"Q4_1.gguf: the export reads a Hugging Face "
                                                   r"LLaMA directory"):
      export.export_gguf(assets.path("smollm2"), self.out)
    self.assertFalse(self.out.parent.exists())

  def test_rope_scaling_without_gguf_keys(self):
    config = dataclasses.replace(CONFIG, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 256))
    base, _ = write_student(self.root, config)
    self.assert_refused(base, r"rope_scaling 'llama3' cannot be written to GGUF")

  def test_a_tokenizer_that_is_not_byte_level_bpe(self):
    base = hf.save_hf(self.root / "base", TINY_LLAMA, random_params(TINY_LLAMA),
                      word_tokenizer(["a few words"]))
    self.assert_refused(base, r"base: only byte-level BPE tokenizers .* this one is WordLevel")

  def test_an_adapter_of_another_rank(self):
    _, adapter = write_student(self.root)
    raw = json.loads((adapter / peft_io.CONFIG).read_text())
    (adapter / peft_io.CONFIG).write_text(json.dumps({**raw, "r": 8}))
    self.assert_refused(adapter, r"adapter_model.safetensors: layers_0.mlp.down_proj has LoRA "
                                 r"factors .*'lora_a': \(128, 4\).* at r=8 needs")

  def test_an_adapter_whose_targets_are_not_its_weights(self):
    _, adapter = write_student(self.root)
    raw = json.loads((adapter / peft_io.CONFIG).read_text())
    (adapter / peft_io.CONFIG).write_text(json.dumps(
        {**raw, "target_modules": [*raw["target_modules"], "o_proj"]}))
    self.assert_refused(adapter, r"target_modules \['down_proj', 'k_proj', 'o_proj', 'q_proj', "
                                 r"'v_proj'\] but the weights adapt \['down_proj', 'k_proj', "
                                 r"'q_proj', 'v_proj'\]")

  def test_an_adapter_of_a_deeper_model(self):
    deeper = dataclasses.replace(CONFIG, num_layers=3)
    _, adapter = write_student(self.root / "deeper", deeper)
    base, _ = write_student(self.root)
    raw = json.loads((adapter / peft_io.CONFIG).read_text())
    (adapter / peft_io.CONFIG).write_text(json.dumps({**raw, "base_model_name_or_path": str(base)}))
    self.assert_refused(adapter, r"layers_2.mlp.down_proj has no kernel in the base model")

  def test_an_interrupted_export_leaves_no_file(self):
    base, _ = write_student(self.root)
    config = hf.load_config(base)
    shapes = export.hf_shapes(config)
    written = []

    def read(name):  # the tensors come from the base; the third is cut off by an interrupt
      if len(written) == 2:
        raise KeyboardInterrupt
      written.append(name)
      with hf.safetensors_reader(base) as tensors:
        return np.asarray(tensors(name, (slice(None),) * len(shapes[name])), np.float32)

    self.out.parent.mkdir(parents=True)
    with self.assertRaises(KeyboardInterrupt):
      multihost.write(self.out, lambda staged: gguf_io.write_gguf(
          staged, config, gguf_io.llama_metadata(config, "x", "f32"), shapes, read, "f32"))
    self.assertLen(written, 2)
    self.assertEqual(list(self.out.parent.iterdir()), [])

  def test_a_killed_exports_temporary_file_goes_with_the_next_export(self):
    base, _ = write_student(self.root)
    self.out.parent.mkdir(parents=True)
    leftover = self.out.with_name(".student.p0.1234.tmp.gguf")  # multihost.temporary's name
    leftover.write_bytes(b"GGUF, cut short by SIGKILL")  # what a killed process leaves
    export.export_gguf(base, self.out, "f32")
    self.assertEqual(list(self.out.parent.iterdir()), [self.out])

  def test_q8_0_rows_that_are_not_whole_blocks_fall_back_to_f16(self):
    self.assertEqual(gguf_io.tensor_type((64, 48), "q8_0"), gguf.GGMLQuantizationType.F16)
    self.assertEqual(gguf_io.tensor_type((48, 64), "q8_0"), gguf.GGMLQuantizationType.Q8_0)
    self.assertEqual(gguf_io.tensor_type((64,), "q8_0"), gguf.GGMLQuantizationType.F32)


class ExportStageTest(absltest.TestCase):

  def test_the_stage_writes_the_named_file_on_request_only(self):
    workdir = pathlib.Path(self.create_tempdir().full_path)
    cfg = apply_overrides(Config(name="tiny"), ["export.dtype=q8_0"])
    self.assertNotIn(layout.EXPORT, pipeline.DEFAULT_STAGES)
    self.assertIn(layout.EXPORT, pipeline.STAGES)
    with self.assertRaisesRegex(FileNotFoundError, r"distill is not complete: run "
                                                   r"--stages=distill first"):
      pipeline.run_stage(layout.EXPORT, cfg, workdir)
    write_student(workdir / layout.DISTILL)  # distill/adapter, beside its base
    (workdir / layout.DISTILL / layout.DONE).write_text(json.dumps({"config": {}, "summary": {}}))
    summary = pipeline.run_stage(layout.EXPORT, cfg, workdir)
    path = workdir / layout.EXPORT / "tiny.gguf"
    self.assertEqual((summary["gguf"], summary["dtype"]), (str(path), "q8_0"))
    self.assertEqual(sorted(p.name for p in path.parent.iterdir()),
                     ["CONFIG", "DONE", "tiny.gguf"])
    metadata = gguf_io.read_metadata(path)
    self.assertEqual(metadata["general.name"], "tiny")
    self.assertEqual(metadata["general.file_type"], gguf.LlamaFileType.MOSTLY_Q8_0)

  def test_export_dtype_is_checked(self):
    with self.assertRaisesRegex(ValueError, r"export.dtype='q4_0': expected one of "
                                            r"\('f32', 'f16', 'q8_0'\)"):
      apply_overrides(Config(), ["export.dtype=q4_0"]).checked()


if __name__ == "__main__":
  absltest.main()
