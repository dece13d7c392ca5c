"""The export stage: the distilled student as one GGUF file that llama.cpp (and transformers'
GGUF loader) serves, `workdir/export/<name>.gguf`.

The adapter is merged into its base one tensor at a time, with the merge the student decodes
with (`lora.merged_kernel`), straight from the base's safetensors into the GGUF writer: the model
is never held whole, let alone twice, so an export needs about what its largest tensor needs
(docs/benchmarks.md measures it). What can refuse refuses before a byte is written: an
architecture or RoPE scaling the writer does not know, a tokenizer that is not byte-level BPE, an
adapter whose rank or targets do not fit the base. The file appears under its name only once
complete (`multihost.write`: a temporary name, then a rename).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time

import numpy as np
from absl import logging
from flax import traverse_util

from slim_jax import checks, multihost, student
from slim_jax.checkpoints import gguf as gguf_io
from slim_jax.checkpoints import hf, peft
from slim_jax.models import lora as lora_lib


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  # GGUF type of the weight matrices: f32, f16 or q8_0 (llama.cpp's 8-bit blocks of 32 with an
  # f16 scale each). Norm scales stay f32; a q8_0 matrix whose rows are not whole blocks is
  # written f16, as llama.cpp's converter does.
  dtype: str = "f16"

  def checked(self) -> ExportConfig:
    checks.one_of("export.dtype", self.dtype, gguf_io.FILE_TYPES)
    return self


def hf_shapes(config) -> dict[str, tuple[int, ...]]:
  """Every HF tensor of a per-layer LLaMA `config` with its shape ([out, in] for weights)."""
  shapes = {}
  for path, struct in traverse_util.flatten_dict(hf.param_shapes(config)).items():
    name, transposed = hf.hf_name(path)
    shapes[name] = tuple(reversed(struct.shape)) if transposed else tuple(struct.shape)
  return shapes


def _adapters(checkpoint: pathlib.Path, config) -> tuple[dict, lora_lib.LoraConfig | None]:
  """({HF weight name: (A [in, r], B [r, out])}, LoraConfig) of an adapter directory, checked
  against the base `config`; ({}, None) for a base checkpoint."""
  if not student.is_adapter(checkpoint):
    return {}, None
  lora, lora_config = peft.load_peft(checkpoint)
  kernels = {path[:-1]: struct.shape for path, struct in
             traverse_util.flatten_dict(hf.param_shapes(config)).items() if path[-1] == "kernel"}
  peft.check_adapter(lora, lora_config, kernels, checkpoint / peft.WEIGHTS)
  factors = {}
  for path, value in traverse_util.flatten_dict(lora).items():
    factors.setdefault(hf.hf_name((*path[:-1], "kernel"))[0], {})[path[-1]] = value
  return {name: (f["lora_a"], f["lora_b"]) for name, f in factors.items()}, lora_config


def export_gguf(checkpoint, path, dtype: str = "f16", name: str = "") -> dict:
  """Writes `path`, a GGUF file of `checkpoint`: an adapter directory merged into its base (from
  its adapter_config.json), or a base Hugging Face directory as it is. `name` is general.name
  (default: the base directory's). Returns what was written: path, dtype, bytes, tensors,
  seconds."""
  from slim_jax.checkpoints.tokenizer import gguf_fields, load_tokenizer  # transformers
  start = time.monotonic()
  checkpoint, path = pathlib.Path(checkpoint), pathlib.Path(path)
  base = student.base_checkpoint(checkpoint) if student.is_adapter(checkpoint) else checkpoint
  if not (base / hf.CONFIG).is_file():
    raise FileNotFoundError(f"{base}: the export reads a Hugging Face LLaMA directory (a .gguf "
                            "base converts to one with checkpoints.convert_gguf_to_hf)")
  config = hf.load_config(base)  # refuses an architecture other than LLaMA, naming config.json
  tokenizer = load_tokenizer(base)
  metadata = {**gguf_io.llama_metadata(config, name or base.name, dtype),
              **gguf_fields(tokenizer, config.vocab_size, str(base))}
  adapters, lora_config = _adapters(checkpoint, config)
  shapes = hf_shapes(config)

  with hf.safetensors_reader(base) as read:

    def merged(tensor: str) -> np.ndarray:
      weight = np.asarray(read(tensor, (slice(None),) * len(shapes[tensor])), np.float32)
      if tensor not in adapters:
        return weight
      return np.asarray(lora_lib.merged_kernel(weight.T, *adapters[tensor], lora_config)).T

    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in multihost.leftover_temporaries(path):  # a killed export's (gigabytes)
      leftover.unlink()
    multihost.write(path, lambda staged: gguf_io.write_gguf(staged, config, metadata, shapes,
                                                           merged, dtype))
  summary = {"gguf": str(path), "dtype": dtype, "bytes": os.path.getsize(path),
             "tensors": len(shapes), "adapted_tensors": len(adapters),
             "seconds": time.monotonic() - start}
  logging.info("exported %s", summary)
  return summary
