"""Test helpers: random LLaMA weights and the same weights in torch's LlamaForCausalLM (test-only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import traverse_util

from slim_jax.checkpoints import hf
from slim_jax.models.llama import Llama, LlamaConfig


def random_params(config: LlamaConfig, seed: int = 0):
  """Weights large enough that a wrong transpose, permutation or rotation shows in the logits."""
  flat = traverse_util.flatten_dict(hf.param_shapes(config))
  keys = jax.random.split(jax.random.key(seed), len(flat))
  params = {}
  for key, (path, struct) in zip(keys, flat.items()):
    noise = jax.random.normal(key, struct.shape, jnp.float32)
    params[path] = (1.0 + 0.1 * noise if path[-1] == "scale" else 0.1 * noise).astype(struct.dtype)
  return traverse_util.unflatten_dict(params)


def torch_model(config: LlamaConfig, params) -> transformers.LlamaForCausalLM:
  """transformers' LlamaForCausalLM (fp32, its default sdpa attention) holding exactly `params`."""
  hf_config = transformers.LlamaConfig(**hf.config_to_hf(config))
  model = transformers.LlamaForCausalLM(hf_config).eval()
  state = {name: torch.from_numpy(np.array(value, np.float32))
           for name, value in hf.params_to_hf(params, config).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
  if config.tie_word_embeddings:
    model.tie_weights()
  return model


def torch_logits(model, tokens, mask=None) -> np.ndarray:
  """The model's logits as float64, so a float64 model's stay exact."""
  with torch.no_grad():
    tokens = torch.from_numpy(np.asarray(tokens, np.int64))
    mask = None if mask is None else torch.from_numpy(np.asarray(mask, np.int64))
    return model(input_ids=tokens, attention_mask=mask).logits.double().numpy()


def jax_logits(config: LlamaConfig, variables, tokens, mask=None) -> np.ndarray:
  return np.asarray(jax.jit(Llama(config).apply)(variables, jnp.asarray(tokens), mask)[0])
