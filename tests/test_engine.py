"""The serving engine against the batched sampler: token for token what `sampler.generate_ids`
writes, whatever rows share a batch, across slot reuse, follow-up jobs, sampling, guided steps
and meshes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from slim_jax import engine, parallel, sampler
from slim_jax.models import llama
from slim_jax.models.llama import Llama
from slim_jax.sampler import SamplingConfig
from tests import llama_reference as ref

TINY = llama.PRESETS["tiny"]
GREEDY = SamplingConfig(max_new_tokens=10)
HOT = SamplingConfig(max_new_tokens=10, temperature=1.5, top_k=40, repetition_penalty=1.2,
                     no_repeat_ngram=3, step_markers=((101, 102), (103,)),
                     line_ends=tuple(range(0, 256, 5)))
LENGTHS = (3, 11, 7, 1, 20, 5, 9)


def _prompts(lengths=LENGTHS, prefix=24, seed=0):
  """Prompts sharing a `prefix`-token opening, then their own `lengths` tokens."""
  rng = np.random.default_rng(seed)
  shared = rng.integers(1, TINY.vocab_size, prefix).tolist()
  return [shared + rng.integers(1, TINY.vocab_size, n).tolist() for n in lengths]


class EngineTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.model = Llama(TINY)
    self.variables = {"params": ref.random_params(TINY)}

  def serve(self, prompts, slots, sampling=GREEDY, stop_ids=(-1,), key=0, order=None,
            variables=None):
    """The engine's tokens per prompt; job i samples with fold_in(key(key), i), as row i of a
    batch does."""
    order = range(len(prompts)) if order is None else order
    got = {}

    def on_done(job, tokens, seconds):
      self.assertGreaterEqual(seconds, 0.0)
      got[job.tag] = tokens
      return []

    jobs = [engine.Job(prompts[i], jax.random.fold_in(jax.random.key(key), i),
                       sampling.max_new_tokens, i) for i in order]
    engine.serve(self.model, variables or self.variables, jobs, on_done, sampling=sampling,
                 stop_ids=stop_ids, pad_id=0, slots=slots, prefix=engine.common_prefix(prompts),
                 max_prompt_len=max(map(len, prompts)))
    return [got[i] for i in range(len(prompts))]

  def batched(self, prompts, sampling=GREEDY, stop_ids=(-1,), key=0):
    return sampler.generate_ids(self.model, self.variables, prompts, jax.random.key(key),
                                sampling, stop_ids, pad_id=0)

  def stops_midway(self, prompts):
    """Stop ids at which the greedy rows end at different lengths, so slots free at different
    steps."""
    free = self.batched(prompts)
    stops = (free[0][2], free[1][6])
    lengths = {len(ids) for ids in self.batched(prompts, stop_ids=stops)}
    self.assertGreater(len(lengths), 2)
    return stops

  def test_one_slot_writes_what_a_batch_of_one_writes(self):
    prompts = _prompts()
    self.assertEqual(self.serve(prompts, slots=1),
                     [self.batched([prompt])[0] for prompt in prompts])

  @parameterized.parameters(2, 3, 8, 16)
  def test_reused_slots_write_what_the_mixed_length_batch_writes(self, slots):
    prompts = _prompts()
    stops = self.stops_midway(prompts)
    self.assertEqual(self.serve(prompts, slots, stop_ids=stops),
                     self.batched(prompts, stop_ids=stops))

  def test_a_row_does_not_depend_on_its_neighbours_when_sampling(self):
    prompts = _prompts()
    expected = self.batched(prompts, HOT, key=3)
    self.assertEqual(self.serve(prompts, 3, HOT, key=3), expected)
    self.assertEqual(self.serve(prompts, 2, HOT, key=3, order=[6, 2, 4, 0, 1, 5, 3]), expected)
    self.assertNotEqual(self.serve(prompts, 3, HOT, key=4), expected)

  def test_prompts_without_a_common_prefix(self):
    prompts = _prompts(prefix=0)
    self.assertEqual(engine.common_prefix(prompts), [])
    self.assertEqual(self.serve(prompts, 4), self.batched(prompts))

  def test_common_prefix_leaves_every_prompt_a_token(self):
    self.assertEqual(engine.common_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6]]), [1, 2, 3])
    self.assertEqual(engine.common_prefix([[1, 2, 3], [1, 2, 3, 4]]), [1, 2])
    self.assertEqual(engine.common_prefix([[7, 8]]), [7])

  def test_follow_up_jobs_take_freed_slots_with_their_own_budget(self):
    prompts = _prompts()
    finished = []

    def on_done(job, tokens, seconds):
      finished.append((job.tag, tokens))
      if job.tag < len(prompts):  # each prompt once more, with a budget of 4
        return [engine.Job(prompts[job.tag], jax.random.key(0), 4, len(prompts) + job.tag)]
      return []

    engine.serve(self.model, self.variables,
                 [engine.Job(p, jax.random.key(0), 10, i) for i, p in enumerate(prompts)],
                 on_done, sampling=GREEDY, stop_ids=(-1,), pad_id=0, slots=3,
                 prefix=engine.common_prefix(prompts), max_prompt_len=max(map(len, prompts)))
    tokens = dict(finished)
    self.assertLen(finished, 2 * len(prompts))
    for i in range(len(prompts)):
      self.assertLen(tokens[i], 10)
      self.assertEqual(tokens[len(prompts) + i], tokens[i][:4])

  def test_compiles_one_decode_loop_and_an_insertion_per_bucket(self):
    prompts = _prompts(prefix=25)  # a prefix length of its own: programs no other test compiled
    stops = self.stops_midway(prompts)
    decodes, inserts = engine._decode._cache_size(), engine._insert._cache_size()
    self.serve(prompts, 3, stop_ids=stops)
    self.assertEqual(engine._decode._cache_size(), decodes + 1)
    # suffixes of 1 to 20 tokens: the 16 and the 24 bucket
    self.assertLessEqual(engine._insert._cache_size(), inserts + 2)
    self.serve(_prompts(prefix=25, seed=1), 3, stop_ids=stops)
    self.assertEqual(engine._decode._cache_size(), decodes + 1)

  def test_a_prompt_without_the_prefix_is_refused(self):
    prompts = _prompts()
    with self.assertRaisesRegex(ValueError, "shared prefix"):
      engine.serve(self.model, self.variables, [engine.Job([1, 2, 3], jax.random.key(0), 4)],
                   lambda *a: [], sampling=GREEDY, stop_ids=(-1,), pad_id=0, slots=2,
                   prefix=prompts[0][:5], max_prompt_len=32)

  def test_scanned_layers_write_what_unrolled_ones_write(self):
    prompts = _prompts()
    params = self.variables["params"]
    stacked = {k: v for k, v in params.items() if not k.startswith("layers_")}
    stacked["layers"] = jax.tree.map(lambda *x: jnp.stack(x), params["layers_0"],
                                     params["layers_1"])
    expected = self.serve(prompts, 3)
    self.model = Llama(dataclasses.replace(TINY, scan_layers=True))  # a stacked cache
    self.assertEqual(self.serve(prompts, 3, variables={"params": stacked}), expected)

  def test_sharded_engine_equals_unsharded(self):
    prompts = _prompts()
    expected = self.serve(prompts, 4)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = parallel.shard_params(self.variables["params"], llama.partition_rules(TINY), mesh)
    with jax.set_mesh(mesh):
      self.assertEqual(self.serve(prompts, 4, variables={"params": sharded}), expected)


if __name__ == "__main__":
  absltest.main()
