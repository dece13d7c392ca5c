"""The one training loop (slim_jax/train/loop.py) on a toy regression fed by the one loader:
resume after a crash, non-finite stop, early stopping with RecBole's patience, ties, and the best
checkpoint across a restart."""

import dataclasses
import json
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from tensorboardX.proto import event_pb2

from slim_jax.data import loader
from slim_jax.train import loop


def _toy_iterator():
  """Batches of a shuffled regression problem y = 3x, from the one loader."""
  xs = np.linspace(-1, 1, 64, dtype=np.float32)
  return loader.training_batches(64, lambda i: {"x": xs[i]}, batch_size=8, seed=0, mesh=None)


@jax.jit
def _toy_step(state, batch):
  """SGD on (w x - 3 x)^2; the noise folds the step in, as real steps fold their dropout key."""
  noise = jax.random.normal(jax.random.fold_in(jax.random.key(0), state["step"])) * 1e-3
  grad = jnp.mean(2 * (state["w"] - 3) * batch["x"] ** 2) + noise
  loss = jnp.mean(((state["w"] - 3) * batch["x"]) ** 2)
  return {"w": state["w"] - 0.5 * grad, "step": state["step"] + 1}, {"loss": loss}


def _toy_state():
  return {"w": jnp.float32(0.0), "step": jnp.int32(0)}


def _toy_eval(state):
  return {"error": float(abs(state["w"] - 3))}


def _tensorboard_scalars(logdir: pathlib.Path, tag: str) -> list[tuple[int, float]]:
  """(step, value) of `tag` as TensorBoard reads the event files: a run restarted with
  purge_step discards what an earlier run logged at or after that step."""
  scalars = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    while data:
      length = struct.unpack("<Q", data[:8])[0]
      event = event_pb2.Event.FromString(data[12:12 + length])
      data = data[12 + length + 4:]
      if event.session_log.status == event_pb2.SessionLog.START:
        scalars = {step: v for step, v in scalars.items() if step < event.step}
      for value in event.summary.value:
        if value.tag == tag:
          scalars[event.step] = value.simple_value
  return sorted(scalars.items())


class LoopTest(absltest.TestCase):

  def test_resumed_run_equals_uninterrupted(self):
    cfg = loop.LoopConfig(steps=24, eval_every=6, log_every=3, checkpoint_every=4,
                          metric="error", mode="min", progress=False)
    whole = loop.run(_toy_step, _toy_state(), _toy_iterator(), _toy_eval, cfg,
                     self.create_tempdir().full_path)

    def crashing(state, batch):
      if int(state["step"]) == 14:
        raise KeyboardInterrupt
      return _toy_step(state, batch)

    workdir = self.create_tempdir().full_path
    with self.assertRaises(KeyboardInterrupt):
      loop.run(crashing, _toy_state(), _toy_iterator(), _toy_eval, cfg, workdir)
    resumed = loop.run(_toy_step, _toy_state(), _toy_iterator(), _toy_eval, cfg, workdir)
    self.assertEqual(float(resumed.state["w"]), float(whole.state["w"]))
    self.assertEqual(resumed.history, [dict(r, eval_seconds=mock["eval_seconds"],
                                            elapsed_seconds=mock["elapsed_seconds"])
                                       for r, mock in zip(whole.history, resumed.history)])
    steps = [json.loads(line)["step"]
             for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    self.assertEqual(steps, sorted(steps))  # rows after the crash's last checkpoint were dropped
    rows = [json.loads(line)
            for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    self.assertEqual(_tensorboard_scalars(pathlib.Path(workdir) / "tensorboard", "error"),
                     [(r["step"], np.float32(r["error"])) for r in rows if "error" in r])

  def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(self):
    def exploding(state, batch):
      state, metrics = _toy_step(state, batch)
      return state, {"loss": jnp.where(state["step"] > 7, jnp.nan, metrics["loss"])}

    workdir = self.create_tempdir().full_path
    cfg = loop.LoopConfig(steps=20, log_every=2, checkpoint_every=4, progress=False)
    with self.assertRaisesRegex(FloatingPointError, r"steps 7\.\.8.*checkpoint is step 4"):
      loop.run(exploding, _toy_state(), _toy_iterator(), _toy_eval, cfg, workdir)
    restarted = loop.run(_toy_step, _toy_state(), _toy_iterator(), _toy_eval,
                         dataclasses.replace(cfg, steps=4), workdir)
    self.assertEqual(restarted.step, 4)

  def test_early_stopping_returns_the_best_state(self):
    def diverging(state, batch):  # improves for 6 steps, then walks away from the optimum
      state, metrics = _toy_step(state, batch)
      return dict(state, w=jnp.where(state["step"] > 6, state["w"] + 1.0, state["w"])), metrics

    cfg = loop.LoopConfig(steps=100, eval_every=2, metric="error", mode="min", patience=3,
                          progress=False)
    result = loop.run(diverging, _toy_state(), _toy_iterator(), _toy_eval, cfg,
                      self.create_tempdir().full_path)
    self.assertTrue(result.stopped_early)
    # As RecBole's stopping_step: 3 worse evaluations (8, 10, 12) are tolerated, the 4th stops.
    self.assertEqual((result.step, result.best_step), (14, 6))
    self.assertAlmostEqual(_toy_eval(result.state)["error"], result.best, places=6)

  def test_a_tie_improves(self):
    """As RecBole: an evaluation equal to the best becomes the best and restarts patience."""
    plateau = lambda state: {"error": max(0.5, 1.0 - int(state["step"]) / 20)}  # 0.5 from step 10
    cfg = loop.LoopConfig(steps=20, eval_every=2, metric="error", mode="min", patience=1,
                          progress=False)
    result = loop.run(_toy_step, _toy_state(), _toy_iterator(), plateau, cfg,
                      self.create_tempdir().full_path)
    self.assertFalse(result.stopped_early)
    self.assertEqual((result.step, result.best_step, result.best), (20, 20, 0.5))

  def test_best_checkpoint_survives_a_restart(self):
    """A resumed run whose best evaluation came before the interruption still returns it."""
    def diverging(state, batch):
      state, metrics = _toy_step(state, batch)
      return dict(state, w=jnp.where(state["step"] > 6, state["w"] + 1.0, state["w"])), metrics

    cfg = loop.LoopConfig(steps=12, eval_every=2, metric="error", mode="min", progress=False)
    workdir = self.create_tempdir().full_path
    loop.run(diverging, _toy_state(), _toy_iterator(), _toy_eval,
             dataclasses.replace(cfg, steps=8), workdir)
    result = loop.run(diverging, _toy_state(), _toy_iterator(), _toy_eval, cfg, workdir)
    self.assertEqual(result.best_step, 6)
    self.assertAlmostEqual(_toy_eval(result.state)["error"], result.best, places=6)


if __name__ == "__main__":
  absltest.main()
