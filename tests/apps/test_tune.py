"""`lrcc-jax tune` on tiny shapes, and how the auto strategy picks the tuned policy up."""

import json
import warnings

import pytest

from lrcc_jax import _policy
from lrcc_jax.apps import cli


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("LRCC_JAX_CACHE", str(tmp_path))
  monkeypatch.delenv("LRCC_JAX_TUNED", raising=False)
  _policy.forget_tuned()
  yield tmp_path
  _policy.forget_tuned()


def test_tune_writes_a_policy_that_auto_then_uses(cache, capsys):
  assert _policy.policy_status()["tuned"] is None
  argv = ["tune", "--widths", "64", "--block-sizes", "16", "--batches", "1,2", "--fractions", "0.25,0.5",
          "--repeats", "1", "--no-progress"]
  assert cli.main(argv) == 0
  assert "wrote" in capsys.readouterr().out
  path = _policy.policy_path()
  assert path.parent == cache and path.exists()
  status = _policy.policy_status()
  assert status["tuned"] == str(path)
  kernel = _policy.gather_kernel("cpu", 16, 64, "float32", "float32")
  chosen = _policy.policy_for("cpu", kernel, "float32")
  assert chosen.source.startswith("tuned by lrcc-jax tune") and chosen.device_kind == _policy.device_kind()
  assert _policy.policy_for("tpu", "mosaic", "float32") == _policy.TPU_PALLAS  # other platforms: defaults


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "device_kind": "TPU v9", "jax": "0", "policies": []})])
def test_corrupt_or_foreign_policy_file_warns_and_uses_defaults(cache, content):
  _policy.policy_path().write_text(content)
  with pytest.warns(UserWarning, match="ignoring the tuned policy"):
    found = _policy.tuned_policies()
  assert found == ()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # warned once: the verdict is cached
    assert _policy.policy_for("cpu", "xla", "float32") == _policy.CPU_XLA
  assert "ignored" in _policy.policy_status()["reason"]


def test_fit_is_conservative():
  from lrcc_jax.apps import tune

  rows = [
      {"kernel": "native", "batch": 1, "fraction": f, "speedup": s}
      for f, s in [(0.05, 3.0), (0.1, 2.0), (0.25, 0.9), (0.5, 1.1)]
  ] + [{"kernel": "native", "batch": 4, "fraction": 0.05, "speedup": 1.5},
       {"kernel": "native", "batch": 4, "fraction": 0.25, "speedup": 0.5}]
  (p,) = tune.fit(rows, "cpu", "test cpu")
  assert p.max_fraction_one_row == 0.1  # 0.5 won but 0.25 lost below it
  assert p.max_gathered_layers == pytest.approx(0.2)
