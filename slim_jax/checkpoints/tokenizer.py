"""Tokenizers: from a Hugging Face directory, or rebuilt from GGUF metadata without torch.

A GGUF file names its tokenizer in `tokenizer.ggml.model`: byte-level BPE ("gpt2": vocabulary,
merges, and the pre-tokenizer the merges were learned with in `tokenizer.ggml.pre`) or LLaMA's
SentencePiece BPE with byte fallback ("llama": pieces and their scores, no merges). The
`tokenizers` library rebuilds the fast tokenizer and transformers wraps it (no model code, hence
no torch). Both share the special tokens: token types, bos/eos/unk/pad roles, chat template.
"""

from __future__ import annotations

import pathlib

from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers, processors)
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import generate_merges

from slim_jax.checkpoints.gguf import read_metadata

# llama.cpp's token types (tokenizer.ggml.token_type)
_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6
_ROLES = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _field(fields, key: str, source: str):
  """fields[key], or an error naming the file and the missing field."""
  if key not in fields:
    raise ValueError(f"{source}: GGUF metadata has no {key} "
                     f"(needed by tokenizer.ggml.model={fields.get('tokenizer.ggml.model')!r})")
  return fields[key]


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


def _byte_level_bpe(fields, tokens, roles, source: str) -> Tokenizer:
  """GPT-2-style BPE: the file lists the merges, split the way `tokenizer.ggml.pre` says."""
  merges = [tuple(merge.split(" ", 1)) for merge in _field(fields, "tokenizer.ggml.merges", source)]
  tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False, byte_fallback=False))
  tokenizer.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"), source)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
  return tokenizer


def _sentencepiece_bpe(fields, tokens, roles, source: str) -> Tokenizer:
  """LLaMA's SentencePiece BPE with byte fallback: transformers' LlamaTokenizer, with merges
  recovered from the piece scores as transformers converts SentencePiece models (SentencePiece
  merges the pair whose joined piece scores highest, never into control, unknown or byte pieces).

  The dummy prefix is a normalizer, as in LLaMA-2's own tokenizer.json, not LlamaTokenizer's
  Metaspace, which skips it when the text starts with a space (" a" would encode as "a" does;
  SentencePiece gives "▁▁a": transformers#46491). Like llama.cpp, it also prefixes the text after
  a control or user-defined token (SentencePiece prefixes the whole text once)."""
  scores = _field(fields, "tokenizer.ggml.scores", source)
  if len(scores) != len(tokens):
    raise ValueError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for "
                     f"{len(tokens)} tokenizer.ggml.tokens")
  types = fields.get("tokenizer.ggml.token_type", ())
  vocab = {token: i for i, token in enumerate(tokens)}
  merges = generate_merges(vocab, dict(zip(tokens, scores)), skip_tokens=[
      t for t, kind in zip(tokens, types) if kind in (_UNKNOWN, _CONTROL, _BYTE)])
  prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
  tokenizer = LlamaTokenizer(  # roles absent from the file must not add LLaMA's default tokens
      vocab=vocab, merges=merges, add_prefix_space=prefix,
      **{"unk_token": None, "bos_token": None, "eos_token": None, **roles}).backend_tokenizer
  tokenizer.normalizer = normalizers.Sequence(
      ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")])
  tokenizer.pre_tokenizer = None
  return tokenizer


_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}
_ADD_BOS = {"llama": True}  # without tokenizer.ggml.add_bos_token, as llama.cpp does


def _special_roles(fields, tokens, source: str) -> dict:
  """{'bos_token': '<s>', ...} for every role the file assigns an id."""
  roles = {}
  for role, name in _ROLES.items():
    key = f"tokenizer.ggml.{role}_token_id"
    index = fields.get(key)
    if index is not None:
      if not 0 <= index < len(tokens):
        raise ValueError(f"{source}: {key}={index} is outside the {len(tokens)} tokens")
      roles[name] = tokens[index]
  return roles


def _add_typed_tokens(tokenizer: Tokenizer, fields, tokens) -> None:
  """Control tokens (<|im_end|>, </s>) as special tokens, user-defined ones as plain added tokens:
  both are matched whole in the raw text, as llama.cpp does, rather than cut into pieces."""
  types = list(fields.get("tokenizer.ggml.token_type", ()))
  tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == _CONTROL])
  tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == _USER_DEFINED])


def tokenizer_from_gguf(fields, source: str = "<gguf>") -> PreTrainedTokenizerFast:
  """The fast tokenizer described by GGUF metadata (`fields`: key -> value, e.g. read_metadata)."""
  kind = fields.get("tokenizer.ggml.model")
  if kind not in _BUILDERS:
    raise ValueError(f"{source}: tokenizer.ggml.model={kind!r} is not supported "
                     f"({', '.join(_BUILDERS)})")
  tokens = list(_field(fields, "tokenizer.ggml.tokens", source))
  roles = _special_roles(fields, tokens, source)
  tokenizer = _BUILDERS[kind](fields, tokens, roles, source)
  _add_typed_tokens(tokenizer, fields, tokens)
  return PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, chat_template=fields.get("tokenizer.chat_template"),
      add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", _ADD_BOS.get(kind, False))),
      add_eos_token=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
      clean_up_tokenization_spaces=False,
      model_max_length=fields.get("llama.context_length", 2048), **roles)


def load_tokenizer(path):
  """The tokenizer of a Hugging Face directory or of a .gguf file."""
  path = pathlib.Path(path)
  if path.suffix == ".gguf":
    return tokenizer_from_gguf(read_metadata(path), str(path))
  return AutoTokenizer.from_pretrained(path)
