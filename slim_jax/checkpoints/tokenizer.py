"""Tokenizers: from a Hugging Face directory, or rebuilt from GGUF metadata without torch.

A GGUF file names its tokenizer in `tokenizer.ggml.model`: byte-level BPE ("gpt2": vocabulary,
merges, and the pre-tokenizer the merges were learned with in `tokenizer.ggml.pre`) or LLaMA's
SentencePiece BPE with byte fallback ("llama": pieces and their scores, no merges). The
`tokenizers` library rebuilds the fast tokenizer and transformers wraps it (no model code, hence
no torch). Both share the special tokens: token types, bos/eos/unk/pad roles, chat template.
`gguf_fields` goes the other way for byte-level BPE: a fast tokenizer's GGUF metadata, as
llama.cpp's convert_hf_to_gguf writes it, for the export stage.
"""

from __future__ import annotations

import json
import pathlib

from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers, processors)
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import generate_merges

from slim_jax.checkpoints.gguf import read_metadata

# llama.cpp's token types (tokenizer.ggml.token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6
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


# One name for each distinct split _pre_tokenizer builds (its other names are aliases).
_PRE_NAMES = ("gpt2", "smollm", "llama-bpe")


def _pre_tokenizer_name(tokenizer: Tokenizer, source: str) -> str:
  """The tokenizer.ggml.pre whose pre-tokenizer (_pre_tokenizer) is exactly `tokenizer`'s."""
  state = json.loads(tokenizer.to_str())["pre_tokenizer"]
  for name in _PRE_NAMES:
    if json.loads(_pre_tokenizer(name, source).__getstate__()) == state:
      return name
  raise ValueError(f"{source}: the pre-tokenizer {json.dumps(state)} has no llama.cpp name "
                   f"(known: the splits of {', '.join(_PRE_NAMES)})")


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


def gguf_fields(tokenizer: PreTrainedTokenizerFast, vocab_size: int, source: str) -> dict:
  """The tokenizer.* metadata of a byte-level BPE fast tokenizer, as convert_hf_to_gguf writes it
  and tokenizer_from_gguf reads it back: every id below the model's `vocab_size` with its token
  (an id without one is "[PAD<id>]", user-defined) and type (added special tokens control, other
  added tokens user-defined), the merges, the pre-tokenizer's name, the special ids, whether
  encoding adds bos/eos (from what the tokenizer does), and the chat template.

  SentencePiece tokenizers (LLaMA-2's) are refused: their scores are not in a fast tokenizer."""
  backend = tokenizer.backend_tokenizer
  state = json.loads(backend.to_str())
  model, decoder = state["model"], state.get("decoder") or {}
  if (model["type"] != "BPE" or model.get("byte_fallback") or state.get("normalizer")
      or decoder.get("type") != "ByteLevel"):
    raise ValueError(f"{source}: only byte-level BPE tokenizers (tokenizer.ggml.model='gpt2') "
                     f"are written to GGUF; this one is {model['type']} with normalizer "
                     f"{(state.get('normalizer') or {}).get('type')} and decoder "
                     f"{decoder.get('type')}")
  by_id = {index: token for token, index in backend.get_vocab(with_added_tokens=True).items()}
  if max(by_id) >= vocab_size:
    raise ValueError(f"{source}: token id {max(by_id)} is past the model's vocab_size "
                     f"{vocab_size}")
  added = tokenizer.added_tokens_decoder
  kind = lambda i: (_USER_DEFINED if i not in by_id else
                    (_CONTROL if added[i].special else _USER_DEFINED) if i in added else _NORMAL)
  merges = [pair if isinstance(pair, str) else " ".join(pair) for pair in model["merges"]]
  sample = tokenizer("a")["input_ids"]
  fields = {
      "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_tokenizer_name(backend, source),
      "tokenizer.ggml.tokens": [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)],
      "tokenizer.ggml.token_type": [kind(i) for i in range(vocab_size)],
      "tokenizer.ggml.merges": merges,
      "tokenizer.ggml.add_bos_token": tokenizer.bos_token_id is not None
                                      and sample[0] == tokenizer.bos_token_id,
      "tokenizer.ggml.add_eos_token": tokenizer.eos_token_id is not None
                                      and sample[-1] == tokenizer.eos_token_id,
  }
  for role, name in _ROLES.items():
    if getattr(tokenizer, f"{name}_id") is not None:
      fields[f"tokenizer.ggml.{role}_token_id"] = getattr(tokenizer, f"{name}_id")
  if isinstance(tokenizer.chat_template, str):
    fields["tokenizer.chat_template"] = tokenizer.chat_template
  return fields
