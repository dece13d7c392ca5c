"""Peak memory of the export stage (slim_jax/export.py): a student's adapter merged into its base
and written as GGUF, a tensor at a time. Prints one JSON object.

  python -m experiments.bench.export_memory --adapter=workdir/ml100k_smollm2/distill/adapter
  python -m experiments.bench.export_memory --layers=1,3     # synthetic LLaMA-2-7B-shaped bases

Each export runs in a fresh process, which reports its peak resident set (VmHWM) and, sampled
every 5 ms, its peak anonymous memory (RssAnon): what the process allocated itself. The rest of
the resident set is the base's safetensors pages, which the reader maps (page cache, shared and
reclaimable under pressure, never a second copy of the model).

--layers builds bases with LLaMA-2-7B's layer shapes (hidden 4096, MLP 11008, 32 heads) in fp16,
as LLaMA-2-7B ships, and SmolLM2's byte-level BPE tokenizer (49,152 tokens, so each embedding
matrix is 1.5x LLaMA-2's 32,000 rows: an upper bound), with a rank-8 adapter on q/k/v/o. If the
anonymous peak does not grow with the layers, a full 32-layer 7B export needs what these need.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from absl import app, flags

_ADAPTER = flags.DEFINE_string("adapter", "", "A distilled student's adapter directory to export.")
_LAYERS = flags.DEFINE_list("layers", [], "Synthetic LLaMA-2-7B-shaped bases of these depths.")
_DTYPES = flags.DEFINE_list("dtypes", ["f16", "q8_0"], "export.dtype values to measure.")
_CHILD = flags.DEFINE_string("child", "", "Internal: export CHECKPOINT:DTYPE:OUT and report.")


def _status(field: str) -> int:
  """A /proc/self/status memory field in bytes."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) * 1024
  raise KeyError(field)


def _child(spec: str) -> dict:
  """Exports in this process, sampling RssAnon meanwhile."""
  from slim_jax import export
  checkpoint, dtype, out = spec.split(":")
  peak, done = [_status("RssAnon")], threading.Event()

  def sample():
    while not done.wait(0.005):
      peak[0] = max(peak[0], _status("RssAnon"))

  sampler = threading.Thread(target=sample, daemon=True)
  before = _status("RssAnon")
  sampler.start()
  summary = export.export_gguf(checkpoint, out, dtype)
  done.set()
  sampler.join()
  pathlib.Path(out).unlink()
  return {**summary, "peak_rss_bytes": _status("VmHWM"), "peak_anon_bytes": peak[0],
          "anon_before_export_bytes": before}


def measure(checkpoint: pathlib.Path, dtype: str, out: pathlib.Path) -> dict:
  result = subprocess.run([sys.executable, "-m", "experiments.bench.export_memory",
                           f"--child={checkpoint}:{dtype}:{out}"], capture_output=True,
                          text=True, check=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


def synthetic_student(root: pathlib.Path, layers: int) -> pathlib.Path:
  """A fp16 LLaMA-2-7B-shaped base of `layers` layers written a tensor at a time (as it would be
  downloaded), and a rank-8 q/k/v/o adapter on it; returns the adapter directory."""
  import safetensors.numpy

  from slim_jax import assets
  from slim_jax.checkpoints import hf, peft
  from slim_jax.checkpoints.tokenizer import load_tokenizer
  from slim_jax.export import hf_shapes
  from slim_jax.models import llama
  from slim_jax.models.lora import LoraConfig
  config = dataclasses.replace(llama.PRESETS["llama2_7b"], num_layers=layers, vocab_size=49152)
  base = root / f"base{layers}"
  base.mkdir(parents=True)
  rng = np.random.default_rng(0)
  weight_map = {}
  for name, shape in hf_shapes(config).items():  # one safetensors file per tensor
    value = (np.ones(shape) if len(shape) == 1 else
             0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
    safetensors.numpy.save_file({name: value}, base / f"{name}.safetensors")
    weight_map[name] = f"{name}.safetensors"
  (base / hf.INDEX).write_text(json.dumps({"weight_map": weight_map}))
  tokenizer = load_tokenizer(assets.path("smollm2"))
  tokenizer.save_pretrained(base)
  (base / hf.CONFIG).write_text(json.dumps(hf.config_to_hf(config, "float16")))
  lora = LoraConfig(rank=8, alpha=16.0, targets=("k_proj", "o_proj", "q_proj", "v_proj"))
  size = config.hidden_size
  outs = {"q_proj": size, "k_proj": config.num_kv_heads * config.head_dim,
          "v_proj": config.num_kv_heads * config.head_dim, "o_proj": size}
  adapters = {f"layers_{i}": {"self_attn": {
      module: {"lora_a": 0.01 * rng.standard_normal((size, 8), dtype=np.float32),
               "lora_b": 0.01 * rng.standard_normal((8, out), dtype=np.float32)}
      for module, out in outs.items()}} for i in range(layers)}
  return peft.save_peft(root / f"adapter{layers}", adapters, lora, base_model=str(base))


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(_child(_CHILD.value)))
    return
  results = {}
  with tempfile.TemporaryDirectory(dir=pathlib.Path.home()) as tmp:
    tmp = pathlib.Path(tmp)
    students = {"adapter": pathlib.Path(_ADAPTER.value)} if _ADAPTER.value else {}
    for layers in _LAYERS.value:
      students[f"llama2_7b_shaped_{layers}_layers"] = synthetic_student(tmp, int(layers))
    for label, adapter in students.items():
      for dtype in _DTYPES.value:
        start = time.monotonic()
        row = measure(adapter, dtype, tmp / f"{label}.gguf")
        results[f"{label}/{dtype}"] = {
            "peak_rss_gib": row["peak_rss_bytes"] / 2**30,
            "peak_anon_gib": row["peak_anon_bytes"] / 2**30,
            "anon_before_export_gib": row["anon_before_export_bytes"] / 2**30,
            "gguf_gib": row["bytes"] / 2**30, "export_seconds": row["seconds"],
            "wall_seconds": time.monotonic() - start}
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
