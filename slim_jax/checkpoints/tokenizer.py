"""Tokenizers: from a Hugging Face directory, or rebuilt from GGUF metadata without torch.

A GGUF file carries a byte-level BPE vocabulary, its merges, token types and a chat template;
the `tokenizers` library rebuilds the fast tokenizer and transformers wraps it (no model code,
hence no torch). The pre-tokenizer must split text the way the merges were learned, which the
file names in `tokenizer.ggml.pre` (llama.cpp's names).
"""

from __future__ import annotations

import pathlib

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

_CONTROL = 3  # llama.cpp token type of special tokens such as <|im_end|>
_USER_DEFINED = 4
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(name: str, source: str):
  """llama.cpp's pre-tokenizer `name` (tokenizer.ggml.pre) as a `tokenizers` pre-tokenizer."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if name in ("gpt2", "default"):
    return byte_level
  if name in ("smollm", "starcoder", "refact"):  # every digit alone, then GPT-2's split
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if name in ("llama-bpe", "llama3", "llama-v3"):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  raise ValueError(f"{source}: tokenizer.ggml.pre={name!r} is not supported "
                   f"(gpt2, default, smollm, starcoder, refact, llama-bpe)")


def tokenizer_from_gguf(fields, source: str = "<gguf>") -> PreTrainedTokenizerFast:
  """The fast tokenizer described by GGUF metadata (`fields`: key -> value, e.g. read_metadata)."""
  if fields.get("tokenizer.ggml.model") != "gpt2":
    raise ValueError(f"{source}: tokenizer.ggml.model={fields.get('tokenizer.ggml.model')!r}; "
                     "only byte-level BPE ('gpt2') is supported; convert SentencePiece models "
                     "from their Hugging Face directory instead")
  tokens = list(fields["tokenizer.ggml.tokens"])
  merges = [tuple(merge.split(" ", 1)) for merge in fields["tokenizer.ggml.merges"]]
  tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False, byte_fallback=False))
  tokenizer.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"), source)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
  types = list(fields.get("tokenizer.ggml.token_type", ()))
  tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == _CONTROL])
  tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
  special = {}
  for role in ("bos", "eos", "unknown", "padding"):
    index = fields.get(f"tokenizer.ggml.{role}_token_id")
    if index is not None:
      special[{"unknown": "unk", "padding": "pad"}.get(role, role) + "_token"] = tokens[index]
  return PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, chat_template=fields.get("tokenizer.chat_template"),
      add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
      add_eos_token=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
      clean_up_tokenization_spaces=False,
      model_max_length=fields.get("llama.context_length", 2048), **special)


def load_tokenizer(path):
  """The tokenizer of a Hugging Face directory or of a .gguf file."""
  path = pathlib.Path(path)
  if path.suffix == ".gguf":
    from slim_jax.checkpoints.gguf import read_metadata
    return tokenizer_from_gguf(read_metadata(path), str(path))
  return AutoTokenizer.from_pretrained(path)
