"""LoRA adapters in Hugging Face PEFT's layout: adapter_config.json + adapter_model.safetensors.

Keys such as base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight hold A as [r, in]
and B as [out, r] (torch Linear layout); ours are [in, r] and [r, out], per layer or stacked.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Mapping

import jax
import numpy as np
import safetensors.numpy
from flax import traverse_util

from slim_jax import multihost
from slim_jax.models.lora import LoraConfig

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?"
    r"\.weight")


def _per_layer(flat):
  """(layer index, block, module, leaf) -> array, unstacking an nn.scan tree."""
  for path, value in flat.items():
    if path[0] == "layers":
      for i, layer_value in enumerate(value):
        yield (i, *path[1:]), layer_value
    else:
      yield (int(path[0].split("_")[1]), *path[1:]), value


def save_peft(directory, lora, config: LoraConfig, base_model: str = "") -> pathlib.Path:
  """Writes the adapter so that peft.PeftModel.from_pretrained(base, directory) loads it."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = {}
  flat = {path: np.asarray(jax.device_get(v), np.float32)
          for path, v in traverse_util.flatten_dict(lora).items()}
  for (layer, block, module, leaf), value in _per_layer(flat):
    letter = {"lora_a": "A", "lora_b": "B"}[leaf]
    key = f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{letter}.weight"
    tensors[key] = np.ascontiguousarray(value.T)
  multihost.write(directory / WEIGHTS, lambda staged: safetensors.numpy.save_file(
      tensors, staged, metadata={"format": "pt"}))
  multihost.write_text(directory / CONFIG, json.dumps({
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
      "target_modules": sorted(config.targets), "bias": "none", "fan_in_fan_out": False,
      "use_rslora": False, "use_dora": False, "inference_mode": True,
  }, indent=2))
  return directory


def load_peft(directory, scan_layers: bool = False):
  """(lora tree, LoraConfig) of a PEFT LoRA adapter for a LLaMA model."""
  directory = pathlib.Path(directory)
  raw = json.loads((directory / CONFIG).read_text())
  for field, supported in (("peft_type", "LORA"), ("bias", "none"), ("use_rslora", False),
                           ("use_dora", False), ("fan_in_fan_out", False)):
    if raw.get(field, supported) != supported:
      raise ValueError(f"{directory / CONFIG}: {field}={raw[field]!r} is not supported "
                       f"(only {supported!r})")
  if not isinstance(raw.get("target_modules"), list):
    raise ValueError(f"{directory / CONFIG}: target_modules must be a list of module names, "
                     f"got {raw.get('target_modules')!r}")
  config = LoraConfig(rank=raw["r"], alpha=float(raw["lora_alpha"]),
                      dropout=float(raw.get("lora_dropout", 0.0)),
                      targets=tuple(sorted(raw["target_modules"])))
  flat = {}
  for key, value in safetensors.numpy.load_file(directory / WEIGHTS).items():
    match = _KEY.fullmatch(key)
    if not match:
      raise ValueError(f"{directory / WEIGHTS}: unexpected tensor {key!r}")
    layer, block, module, letter = match.groups()
    flat[(int(layer), block, module, f"lora_{letter.lower()}")] = np.ascontiguousarray(value.T)
  if scan_layers:
    count = max(path[0] for path in flat) + 1
    stacked = {("layers", *path[1:]): np.stack([flat[(i, *path[1:])] for i in range(count)])
               for path in flat if path[0] == 0}
    return traverse_util.unflatten_dict(stacked), config
  return traverse_util.unflatten_dict(
      {(f"layers_{path[0]}", *path[1:]): v for path, v in flat.items()}), config


def check_adapter(lora, config: LoraConfig, kernels: Mapping[tuple[str, ...], tuple[int, int]],
                  source) -> None:
  """That a per-layer adapter (load_peft's tree) fits the base whose kernel shapes [in, out] are
  `kernels` (by module path, e.g. ("layers_0", "self_attn", "q_proj")): every adapted module
  exists there, the modules adapted are the config's targets, and A, B are [in, r], [r, out] at
  the config's r. Merging a mismatch would fail deep in a matmul, or silently adapt something
  else; this names the file and the module before anything is merged or written."""
  modules = {}
  for path, value in traverse_util.flatten_dict(lora).items():
    modules.setdefault(path[:-1], {})[path[-1]] = np.shape(value)
  adapted = sorted({path[-1] for path in modules})
  if adapted != sorted(config.targets):
    raise ValueError(f"{source}: target_modules {sorted(config.targets)} but the weights adapt "
                     f"{adapted}")
  for module, factors in sorted(modules.items()):
    name = ".".join(module)
    if module not in kernels:
      raise ValueError(f"{source}: {name} has no kernel in the base model")
    fan_in, fan_out = kernels[module]
    expected = {"lora_a": (fan_in, config.rank), "lora_b": (config.rank, fan_out)}
    if factors != expected:
      raise ValueError(f"{source}: {name} has LoRA factors {factors}; the base kernel "
                       f"[{fan_in}, {fan_out}] at r={config.rank} needs {expected}")
