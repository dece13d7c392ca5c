"""slim-jax entry point: runs SLIM's pipeline stages for one experiment config.

  python launch.py                                   # the embedded default, every stage
  python launch.py --stages=fetch,prepare --workdir=/tmp/slim
  python launch.py --config=experiments/configs/ml100k_smollm2.py --set rec.max_len=100

On a multi-host TPU pod, run the same command with --multiprocess on every host; JAX's
distributed runtime then initialises from the environment (TPU metadata, SLURM, Open MPI).
"""

from __future__ import annotations

import pathlib

import jax
from absl import app, flags, logging

from slim_jax import config as config_lib, pipeline

_DEFAULT_CONFIG = pathlib.Path(__file__).parent / "experiments" / "configs" / "ml100k_smollm2.py"

_CONFIG = flags.DEFINE_string("config", str(_DEFAULT_CONFIG),
                              "Experiment config file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/ml100k_smollm2", "Where every stage writes.")
_STAGES = flags.DEFINE_list("stages", None, "Stages to run, in order (default: all).")
_SET = flags.DEFINE_multi_string(
    "set", [], "Config override key.sub=value; repeatable. preset=NAME picks the config file's "
    "preset (e.g. quick, full) before the other overrides apply.")
_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess", False, "Call jax.distributed.initialize() first: pass it on every host of "
    "a multi-host pod or cluster.")


def main(argv):
  del argv
  if _MULTIPROCESS.value:
    jax.distributed.initialize()
  logging.info("JAX process %d of %d, %d devices", jax.process_index(), jax.process_count(),
               jax.device_count())

  cfg = config_lib.from_flags(_CONFIG.value, _SET.value).checked()
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config_lib.to_json(cfg))
  stages = _STAGES.value or list(pipeline.STAGES)
  pipeline.run(cfg, workdir, stages)
  logging.info("done: %s in %s", ",".join(stages), workdir)


if __name__ == "__main__":
  app.run(main)
