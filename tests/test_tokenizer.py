"""SentencePiece (LLaMA-2-style) tokenizers rebuilt from GGUF metadata encode and decode as the
`sentencepiece` library does. There is no LLaMA-2 tokenizer offline, so the test trains a tiny
one with LLaMA's trainer settings and writes it to GGUF the way llama.cpp's converter does."""

import pathlib
import random
import tempfile

import gguf
import sentencepiece as spm
import transformers
from absl.testing import absltest

from slim_jax.checkpoints.gguf import read_metadata
from slim_jax.checkpoints.tokenizer import load_tokenizer, tokenizer_from_gguf

WORDS = ("the a of and movie film story toy space war love comedy drama night day city family "
         "friend watch recommend because user likes history rating great good bad classic "
         "animated action thriller romantic director actor music year first second third step "
         "reason it is was this that with for from more than similar genre plot ending").split()
# Test strings beyond the training text: spaces at either end and in runs, newlines and tabs,
# digits, punctuation, and characters never seen in training (byte fallback).
EDGE_CASES = [
    "", " ", "  ", "\n", "hello world", "The movie", " leading", "  two leading", "trailing ",
    "trailing  ", "a  b   c    d", "line one\nline two\n\n", "\tindented\ttabs", " \t \n ",
    "1995", "Toy Story (1995) is a great animated movie, rated 4.5/5!", "007: 10,000,000 $",
    "Café « naïve » — WALL·E", "日本の映画", "🎬🍿 popcorn 🍿", "Ω≈ç√∫", "\x00\x7f",
    "ends with emoji 🎬", "user likes\r\nwindows lines", "▁already▁metaspace▁",
]


def training_lines(rng: random.Random, count: int):
  """Varied English-like lines: capitals, punctuation, digits, space runs, tabs."""
  for _ in range(count):
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 16))]
    if rng.random() < 0.3:
      words[0] = words[0].capitalize()
    if rng.random() < 0.3:
      words.insert(rng.randrange(len(words)), str(rng.randint(0, 2024)))
    line = " ".join(words) + rng.choice([".", "!", "?", ",", ""])
    if rng.random() < 0.2:
      line = rng.choice(["  ", "    ", "\t"]) + line.replace(" ", rng.choice(["  ", " "]), 2)
    yield line


def train_sentencepiece(directory: pathlib.Path) -> spm.SentencePieceProcessor:
  """A tiny BPE model with LLaMA-2's trainer settings (plus one user-defined symbol)."""
  lines = list(training_lines(random.Random(0), 600))
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(directory / "sp"), vocab_size=500,
      model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>",
      eos_piece="</s>", user_defined_symbols=["<sep>"], num_threads=1, minloglevel=2)
  return spm.SentencePieceProcessor(model_file=str(directory / "sp.model"))


def write_gguf(sp: spm.SentencePieceProcessor, path: pathlib.Path, user_defined=("<sep>",)):
  """Tokenizer metadata as llama.cpp's convert_hf_to_gguf `_set_vocab_sentencepiece` writes it;
  user-defined pieces are typed as llama.cpp types a HF repo's non-special added tokens."""
  def token_type(i):
    for test, kind in ((sp.is_unknown, gguf.TokenType.UNKNOWN),
                       (sp.is_control, gguf.TokenType.CONTROL),
                       (sp.is_unused, gguf.TokenType.UNUSED), (sp.is_byte, gguf.TokenType.BYTE)):
      if test(i):
        return kind
    return (gguf.TokenType.USER_DEFINED if sp.id_to_piece(i) in user_defined
            else gguf.TokenType.NORMAL)

  ids = range(sp.vocab_size())
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_tokenizer_model("llama")
  writer.add_tokenizer_pre("default")
  writer.add_token_list([sp.id_to_piece(i).encode("utf-8") for i in ids])
  writer.add_token_scores([sp.get_score(i) for i in ids])
  writer.add_token_types([token_type(i) for i in ids])
  writer.add_bos_token_id(sp.bos_id())
  writer.add_eos_token_id(sp.eos_id())
  writer.add_unk_token_id(sp.unk_id())
  writer.add_add_bos_token(True)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()  # no tensors: read_metadata needs none
  writer.close()


class SentencePieceGgufTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    directory = pathlib.Path(cls.tmp.name)
    cls.sp = train_sentencepiece(directory)
    cls.path = directory / "tiny-llama.gguf"
    write_gguf(cls.sp, cls.path)
    cls.ours = load_tokenizer(cls.path)
    rng = random.Random(1)
    alphabet = list(" \t\n.,!?'-0123456789éü日🎬") + WORDS * 2
    cls.texts = EDGE_CASES + list(training_lines(rng, 100)) + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(200)]

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_the_vocabulary_has_merges_and_every_token_type(self):
    self.assertEqual(self.sp.vocab_size(), 500)
    self.assertLen(self.ours, 500)
    types = set(read_metadata(self.path)["tokenizer.ggml.token_type"])
    self.assertEqual(types, {1, 2, 3, 4, 6})
    pieces = [self.sp.id_to_piece(i) for i in range(self.sp.vocab_size())]
    self.assertIn("▁▁", pieces)  # whitespace-only pieces, as LLaMA's vocabulary has
    self.assertGreater(sum(len(p) > 3 and not p.startswith("<") for p in pieces), 50)

  def test_encodes_like_sentencepiece(self):
    bos = self.sp.bos_id()
    for text in self.texts:
      with self.subTest(text=text):
        self.assertEqual(self.ours(text)["input_ids"], [bos] + self.sp.encode(text))

  def test_decodes_like_sentencepiece(self):
    for text in self.texts:
      ids = self.sp.encode(text)
      with self.subTest(text=text):
        self.assertEqual(self.ours.decode(ids), self.sp.decode(ids))
        self.assertEqual(self.ours.decode([self.sp.bos_id()] + ids + [self.sp.eos_id()],
                                          skip_special_tokens=True), self.sp.decode(ids))

  def test_special_tokens(self):
    ours, sp = self.ours, self.sp
    self.assertEqual((ours.bos_token_id, ours.eos_token_id, ours.unk_token_id),
                     (sp.bos_id(), sp.eos_id(), sp.unk_id()))
    self.assertIsNone(ours.pad_token)
    self.assertEqual(ours("hi", add_special_tokens=False)["input_ids"], sp.encode("hi"))

  def test_added_tokens_split_the_text_like_llama_cpp(self):
    # SentencePiece never parses control tokens out of text ("<s>" is three characters to it), and
    # it matches user-defined ones inside the text after prefixing the whole text once, so
    # "<sep>world" is ["▁", "<sep>", "world"]. Here, as in llama.cpp (llama_tokenize_impl) and
    # LLaMA-2's own tokenizer.json, control and user-defined tokens split the raw text and each
    # fragment is encoded alone, dummy prefix included: ["<sep>", "▁world"]. That is how LLaMA-2
    # chat prompts ("<s>[INST] ...") are tokenized by Meta's code: sp.encode per turn.
    sp = self.sp
    piece = sp.piece_to_id
    cases = {
        "<sep>world": [piece("<sep>")] + sp.encode("world"),
        "a <sep> b": sp.encode("a ") + [piece("<sep>")] + sp.encode(" b"),
        "<s>[INST] hi [/INST]</s>": [1] + sp.encode("[INST] hi [/INST]") + [2],
    }
    for text, expected in cases.items():
      with self.subTest(text=text):
        self.assertEqual(self.ours(text, add_special_tokens=False)["input_ids"], expected)
        self.assertNotEqual(expected, sp.encode(text))  # the difference is real
    self.assertEqual(self.ours.decode(cases["<sep>world"]), "<sep> world")

  def test_bos_is_added_by_default_and_the_hf_directory_keeps_it_all(self):
    fields = read_metadata(self.path)
    del fields["tokenizer.ggml.add_bos_token"]  # llama.cpp's default for SentencePiece: add BOS
    text = "  Toy Story <sep> (1995)\n"
    self.assertEqual(tokenizer_from_gguf(fields)(text)["input_ids"],
                     self.ours(text)["input_ids"])
    with tempfile.TemporaryDirectory() as tmp:
      self.ours.save_pretrained(tmp)
      auto = transformers.AutoTokenizer.from_pretrained(tmp)
    for text in self.texts[:60] + [text]:
      with self.subTest(text=text):
        ids = self.ours(text)["input_ids"]
        self.assertEqual(auto(text)["input_ids"], ids)
        self.assertEqual(auto.decode(ids), self.ours.decode(ids))

  def test_errors_name_the_file_and_field(self):
    fields = read_metadata(self.path)
    del fields["tokenizer.ggml.scores"]
    with self.assertRaisesRegex(ValueError, "my.gguf: .*tokenizer.ggml.scores"):
      tokenizer_from_gguf(fields, "my.gguf")
    with self.assertRaisesRegex(ValueError, "my.gguf: tokenizer.ggml.model='t5'"):
      tokenizer_from_gguf({**fields, "tokenizer.ggml.model": "t5"}, "my.gguf")


if __name__ == "__main__":
  absltest.main()
