"""Where the time of a SmolLM2 LoRA training step or of batched generation goes, op by op.

  python -m experiments.bench.profile_llama [--part=train|generate] [--top=30]

Traces one call with jax.profiler, maps every XLA op it ran to its source (the op_name metadata
of the compiled HLO, layer numbers folded) and prints JSON: wall milliseconds per (source, output
shape), heaviest first. XLA:CPU runs independent ops on several threads at once, so summed op
durations overcount; here each 10 µs of the trace is split among the ops running in it, and the
shares add up to the wall time. Same workloads as experiments/bench/llama.py.
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
import tempfile

import jax
import numpy as np
from absl import app, flags

from experiments.bench import llama as bench_llama
from slim_jax import parallel, sampler

_PART = flags.DEFINE_enum("part", "train", ["train", "generate"], "What to profile.")
_TOP = flags.DEFINE_integer("top", 30, "Rows to print.")
BIN_NS = 10_000


def workload(part: str, mesh):
  """(a call that runs one LoRA step or one batch-16 generation, its compiled HLO text)."""
  _, config, params = bench_llama.smollm2(mesh)
  if part == "train":
    step, args, train = bench_llama.lora_step(config, params, mesh)
    return train, step.lower(*args).compile().as_text()  # lowered before a call donates args
  args, options = bench_llama.generation(config, params, batch_size=16)
  hlo = sampler.generate_tokens.lower(*args, **options).compile().as_text()
  return lambda: sampler.generate_tokens(*args, **options), hlo


def op_sources(hlo: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (source op_name with layer numbers folded, output shape)."""
  sources = {}
  for line in hlo.splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", line)
    op_name = re.search(r'op_name="([^"]*)"', line)
    if match and op_name:
      source = re.sub(r"layers_\d+", "layers_N", op_name.group(1).split("/", 1)[-1])
      sources.setdefault(match.group(1), (source, match.group(2)))
  return sources


def wall_shares(events: list[tuple[str, float, float]]) -> collections.Counter:
  """Wall nanoseconds per op name, each time bin split evenly among the ops running in it."""
  start = min(begin for _, begin, _ in events)
  end = max(begin + length for _, begin, length in events)
  running = np.zeros(int((end - start) // BIN_NS) + 2)
  spans = [(name, int((begin - start) // BIN_NS), int((begin + length - start) // BIN_NS) + 1)
           for name, begin, length in events]
  for _, first, last in spans:
    running[first:last] += 1
  share = np.concatenate([[0.0], np.cumsum(np.where(running > 0, BIN_NS / np.maximum(running, 1),
                                                    0.0))])
  totals = collections.Counter()
  for name, first, last in spans:
    totals[name] += share[last] - share[first]
  return totals


def main(argv):
  del argv
  mesh = parallel.make_mesh()
  with jax.set_mesh(mesh):
    run, hlo = workload(_PART.value, mesh)
    sources = op_sources(hlo)
    jax.block_until_ready(run())  # compile and warm up
    with tempfile.TemporaryDirectory() as trace_dir:
      with jax.profiler.trace(trace_dir):
        jax.block_until_ready(run())
      path = next(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
      data = jax.profiler.ProfileData.from_file(str(path))
  events = [(event.name, event.start_ns, event.duration_ns)
            for plane in data.planes for line in plane.lines if "XLAEigen" in line.name
            for event in line.events if event.name in sources]
  by_source = collections.Counter()
  for name, nanoseconds in wall_shares(events).items():
    by_source[sources[name]] += nanoseconds
  total = sum(by_source.values())
  print(json.dumps({
      "part": _PART.value, "ops_wall_ms": total / 1e6,
      "top": [{"ms": round(ns / 1e6, 1), "share": round(ns / total, 3), "source": source,
               "shape": shape} for (source, shape), ns in by_source.most_common(_TOP.value)],
  }, indent=1))


if __name__ == "__main__":
  app.run(main)
