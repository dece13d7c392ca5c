"""Loader throughput on ml-100k: 256 x 50 next-item batches per second, as JSON.

  python -m experiments.bench.loader [--batches=2000]

Measures host-side batches (what a training step could wait on) and global arrays placed on a
mesh of all local devices.
"""

import json
import time

from absl import app, flags

from slim_jax import assets, parallel
from slim_jax.data import formats, loader, preprocess

_BATCHES = flags.DEFINE_integer("batches", 2000, "Batches to time per setting.")


def _rate(iterator, count: int) -> float:
  next(iterator)  # start the prefetch thread outside the timing
  start = time.perf_counter()
  for _ in range(count):
    next(iterator)
  return count / (time.perf_counter() - start)


def main(argv):
  del argv
  prepared = preprocess.prepare(formats.read_dataset("recbole", assets.path("ml-100k")),
                                preprocess.DataConfig())
  mesh = parallel.make_mesh()
  results = {"batch_size": 256, "max_len": 50, "devices": mesh.size}
  for per_position in (False, True):
    mode = "per_position" if per_position else "last_position"
    for placed in (None, mesh):
      iterator, steps = loader.next_item_training(prepared, max_len=50, batch_size=256, seed=0,
                                                  mesh=placed, per_position=per_position)
      key = f"{mode}_{'global_arrays' if placed else 'host'}_batches_per_s"
      results[key] = round(_rate(iterator, _BATCHES.value), 1)
    results[f"{mode}_batches_per_epoch"] = steps
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
