"""slim-jax entry point: runs SLIM's pipeline stages for one experiment config.

  python launch.py                                   # the embedded default, every stage
  python launch.py --stages=fetch,prepare --workdir=/tmp/slim
  python launch.py --config=experiments/configs/ml100k_smollm2.py --set rec.max_len=100

On a multi-host TPU pod, run the same command with --multiprocess on every host; JAX's
distributed runtime then initialises from the environment (TPU metadata, SLURM, Open MPI).
Elsewhere name the coordinator, the process count and each process's id:

  python launch.py --coordinator_address=10.0.0.1:8476 --num_processes=2 --process_id=0 ...

A run prints its stages, progress and warnings; --verbosity=1 adds other libraries' INFO lines
(orbax's checkpointing, JAX's backends) and everyone's DEBUG lines.
"""

from __future__ import annotations

import os
import pathlib

import jax
from absl import app, flags, logging

from slim_jax import assets, config as config_lib, host, logs, multihost, pipeline

_DEFAULT_CONFIG = pathlib.Path(__file__).parent / "experiments" / "configs" / "ml100k_smollm2.py"

_CONFIG = flags.DEFINE_string("config", str(_DEFAULT_CONFIG),
                              "Experiment config file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/ml100k_smollm2", "Where every stage writes.")
_STAGES = flags.DEFINE_list("stages", None, "Stages to run, in order (default: all but export).")
_SET = flags.DEFINE_multi_string(
    "set", [], "Config override key.sub=value; repeatable. preset=NAME picks the config file's "
    "preset (e.g. quick, full) before the other overrides apply.")
_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess", False, "Call jax.distributed.initialize() first: pass it on every host of "
    "a multi-host pod or cluster; alone, the runtime finds its peers (TPU, SLURM, Open MPI).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0's coordinator service (implies "
    "--multiprocess; with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to N-1.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
        assets.cache_dir() / "xla"), "Directory of compiled XLA programs kept for the next run "
    "(JAX's persistent compilation cache; default: $JAX_COMPILATION_CACHE_DIR, else under the "
    "asset cache); empty: none.")


def main(argv):
  del argv
  logs.hide_third_party_info(__file__)
  if _COMPILATION_CACHE.value:
    host.cache_compilations(_COMPILATION_CACHE.value)
  if _MULTIPROCESS.value or _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not multihost.is_writer():  # one log for the job: process 0's (progress bars too)
    logging.set_verbosity(logging.WARNING)
  logging.info("JAX process %d of %d, %d devices", jax.process_index(), jax.process_count(),
               jax.device_count())

  cfg = config_lib.from_flags(_CONFIG.value, _SET.value).checked()
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  multihost.write_text(workdir / "config.json", config_lib.to_json(cfg))
  stages = _STAGES.value or list(pipeline.DEFAULT_STAGES)
  pipeline.run(cfg, workdir, stages)
  logging.info("done: %s in %s", ",".join(stages), workdir)


if __name__ == "__main__":
  app.run(main)
