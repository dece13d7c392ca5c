"""Config files, --set overrides and the start-up checks."""

import dataclasses
import pathlib

from absl.testing import absltest

from slim_jax import config, pipeline

ROOT = pathlib.Path(__file__).parent.parent


class OverrideTest(absltest.TestCase):

  def test_nested_typed_overrides(self):
    cfg = config.apply_overrides(config.Config(), [
        "data.item_text_max_chars=100", "data.min_rating=3.5", "mesh.fsdp=2", "name=x"])
    self.assertEqual(cfg.data.item_text_max_chars, 100)
    self.assertEqual(cfg.data.min_rating, 3.5)
    self.assertEqual(cfg.mesh.fsdp, 2)
    self.assertEqual(cfg.name, "x")
    self.assertIsNone(config.apply_overrides(cfg, ["data.min_rating=none"]).data.min_rating)

  def test_unknown_key_lists_valid_keys(self):
    with self.assertRaisesRegex(KeyError, r"data\.max_len.*valid keys:.*rec\.max_len"):
      config.apply_overrides(config.Config(), ["data.max_len=3"])

  def test_a_bad_value_of_any_section_fails_before_the_first_stage(self):
    bad = {  # a section: (its bad value, the error naming it)
        "data": ("data.time_order=newest", "data.time_order='newest'"),
        "mesh": ("mesh.fsdp=0", r"mesh \{'data': -1, 'fsdp': 0"),
        "prompt": ("prompt.instruction=Tell me about {history}", "Step 1:"),
        "teacher": ("teacher.kind=anthropic", "teacher.kind='anthropic'"),
        "distill": ("distill.heldout_fraction=1.5", r"distill.heldout_fraction=1.5: .*\(0, 1\)"),
        "student": ("student.top_p=0", r"student.top_p=0.0: .*\(0, 1\]"),
        "encoder": ("encoder.postprocess=pca", "encoder.postprocess='pca'"),
        "rec": ("rec.schedule=linear", "rec.schedule='linear'"),
        "slim": ("slim.modes=plain,backbone_plus", "slim.modes='backbone_plus'"),
        "export": ("export.dtype=q4_0", "export.dtype='q4_0'"),
    }
    sections = [f.name for f in dataclasses.fields(config.Config)
                if dataclasses.is_dataclass(getattr(config.Config(), f.name))]
    self.assertCountEqual(bad, sections)
    cases = [([assignment], message) for assignment, message in bad.values()]
    cases += [  # rules between two sections
        (["slim.finetune_encoder=true", "encoder.kind=llm_pooled"], "trains a MiniLM"),
        (["distill.max_rationale_tokens=2000"], "the student's prompt budget 1024")]
    workdir = pathlib.Path(self.create_tempdir().full_path) / "work"
    for assignments, message in cases:
      with self.subTest(assignments[0]):
        cfg = config.apply_overrides(config.Config(), assignments)
        with self.assertRaisesRegex(ValueError, message):
          pipeline.run(cfg, workdir, ["fetch", "prepare"])
        self.assertFalse(workdir.exists())  # nothing ran

  def test_wrong_type(self):
    with self.assertRaisesRegex(ValueError, r"rec\.max_len=abc: expected int"):
      config.apply_overrides(config.Config(), ["rec.max_len=abc"])

  def test_section_and_syntax_errors(self):
    with self.assertRaisesRegex(KeyError, "is a section"):
      config.apply_overrides(config.Config(), ["data=1"])
    with self.assertRaisesRegex(ValueError, "key.sub=value"):
      config.apply_overrides(config.Config(), ["rec.max_len"])

  def test_tuple_fields(self):
    cfg = config.apply_overrides(config.Config(), ["distill.lora_targets=q_proj,v_proj,down_proj"])
    self.assertEqual(cfg.distill.lora_targets, ("q_proj", "v_proj", "down_proj"))

  def test_the_default_and_the_experiment_files_pass_the_checks(self):
    self.assertEqual(config.Config().checked(), config.Config())
    for path in sorted((ROOT / "experiments" / "configs").glob("*.py")):
      source = path.read_text()
      if "def get_config" in source:
        with self.subTest(path.name):
          cfg = config.load_config(path).checked()
          self.assertTrue(config.to_json(cfg))

  def test_preset_is_chosen_before_other_overrides(self):
    path = ROOT / "experiments" / "configs" / "ml100k_smollm2.py"
    quick = config.from_flags(path, [])
    full = config.from_flags(path, ["preset=full", "teacher.max_tokens=99"])
    self.assertEqual((quick.preset, full.preset), ("quick", "full"))
    self.assertGreater(quick.teacher.max_users, 0)
    self.assertEqual(full.teacher.max_users, 0)  # every user
    self.assertEqual(full.teacher.max_tokens, 99)
    with self.assertRaisesRegex(ValueError, "preset='huge'"):
      config.from_flags(path, ["preset=huge"])

  def test_missing_config_file(self):
    with self.assertRaisesRegex(FileNotFoundError, "nope.py"):
      config.load_config(ROOT / "experiments" / "nope.py")


if __name__ == "__main__":
  absltest.main()
