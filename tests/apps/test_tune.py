"""`lrcc-jax tune` on tiny shapes, and how the auto strategy picks the tuned policy up."""

import dataclasses
import json
import math
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


def _row(batch, fraction, gather_ms, dense_ms, kernel="native"):
  n_blocks = 64
  return {"kernel": kernel, "batch": batch, "capacity": round(fraction * n_blocks), "n_blocks": n_blocks,
          "block_bytes": 16 * 1024 * 4, "fraction": round(fraction * n_blocks) / n_blocks,
          "gather_ms": gather_ms, "dense_ms": dense_ms}


def test_fit_picks_the_least_time_lost_and_is_no_worse_than_the_default():
  """Guards the fit: one row gathers up to the largest fraction where gathering wins, several
  rows up to the layers-read value that loses least, and the fitted policy's decisions lose
  no more time on the measured rows than the shipped default's."""
  from lrcc_jax.apps import tune

  rows = [_row(1, f, g, 1.0) for f, g in [(0.0625, 0.3), (0.125, 0.5), (0.25, 0.8), (0.5, 1.4)]]
  rows += [_row(b, f, g, 1.0) for b, f, g in [(4, 0.0625, 0.6), (4, 0.25, 1.5), (16, 0.0625, 2.0),
                                                 (2, 0.125, 0.9), (2, 0.5, 1.2), (64, 0.0625, 3.0)]]
  (p,) = tune.fit(rows, "cpu", "test cpu")
  assert p.kernel == "native" and p.platform == "cpu" and p.source.startswith("tuned by")
  assert p.max_fraction_one_row == 0.25  # 0.5 loses (1.4 ms against 1.0)
  assert tune._loss(p, rows) == 0.0  # every measured case takes its faster strategy
  assert tune._loss(p, rows) <= tune._loss(_policy.CPU_NATIVE, rows)
  for r in rows:  # judged by the decision "auto" makes, shared mode included
    gathers = _policy.batch_mode(p, r["batch"], r["capacity"], 64, r["block_bytes"]) != "dense"
    assert gathers == (r["gather_ms"] < r["dense_ms"])


def test_fit_searches_the_shared_mode_the_small_block_rows_and_the_fused_replacement():
  """Guards the fields past `gather_pays`: 16 rows at 6% gather under the default's
  `shared_max_fraction` (measured slower here: turned off); 8 rows of small blocks past
  its `small_block_max_rows` (faster gathered here: raised); and the fused kernel in place of the dense
  fallback (4 rows x 25% = one layer, slower here; 3 rows x 30% = 0.89 layers, faster):
  `fused_max_layers` drops between the two."""
  from lrcc_jax.apps import tune

  default = _policy.CPU_NATIVE
  slow_shared = _row(16, 0.0625, 2.0, 1.0)
  assert _policy.batch_mode(default, 16, slow_shared["capacity"], 64, slow_shared["block_bytes"]) == "shared"
  small = {**_row(8, 0.0625, 0.5, 1.0), "block_bytes": 1024}  # 8 rows x 6% of 1 KiB blocks
  assert _policy.batch_mode(default, 8, small["capacity"], 64, 1024) == "dense"
  fused_slow = {**_row(4, 0.25, 1.5, 1.0), "fused_eligible": True}
  fused_fast = {**_row(3, 0.3, 0.5, 1.0), "fused_eligible": True}  # 3 x 19 blocks: 0.89 layers
  rows = [slow_shared, small, fused_slow, fused_fast, _row(1, 0.125, 0.5, 1.0), _row(1, 0.25, 1.2, 1.0)]
  (p,) = tune.fit(rows, "cpu", "test cpu")
  assert _policy.batch_mode(p, 16, slow_shared["capacity"], 64, slow_shared["block_bytes"]) == "dense"
  assert _policy.batch_mode(p, 8, small["capacity"], 64, 1024) != "dense" and p.small_block_max_rows >= 8
  assert 0.89 <= p.fused_max_layers < 1.0
  assert tune._loss(p, rows) == 0.0 < tune._loss(default, rows)


def test_fit_keeps_the_default_where_the_measurements_do_not_decide():
  """Guards the tie rule: cases where both strategies take the same time leave the shipped
  default's values (and its byte limits) in place."""
  from lrcc_jax.apps import tune

  rows = [_row(1, 0.25, 1.0, 1.0, "xla"), _row(8, 0.25, 2.0, 2.0, "xla")]
  (p,) = tune.fit(rows, "cpu", "test cpu")
  keys = ("max_fraction_one_row", "max_gathered_layers", "small_fraction", "small_fraction_max_rows",
          "max_gather_bytes", "min_batched_block_bytes")
  assert {k: getattr(p, k) for k in keys} == {k: getattr(_policy.CPU_XLA, k) for k in keys}


def test_tune_quick_writes_a_valid_file(cache, capsys):
  """Guards `--quick` (the tiny grid) end to end: the file loads back as this device's policy."""
  assert cli.main(["tune", "--quick", "--repeats", "1", "--no-progress"]) == 0
  (policy,) = _policy.load_policy_file(_policy.policy_path(), _policy.device_kind())
  assert policy.platform == _policy.current_platform() and policy.weight_dtype == "float32"
  assert "256" in capsys.readouterr().out


def test_past_eight_rows_the_fused_kernel_is_judged_by_its_own_time():
  """Guards the small-fraction replacement in the fit: 32 rows at 5% are slow through the
  tile kernel (`gather_ms`) but fast fused (`fused_ms`); the loss charges the fused time
  exactly where `fused_small_fraction` covers the row, and the fit keeps it on, while 32
  rows at 25% fused slower than dense turn nothing on."""
  from lrcc_jax.apps import tune

  units = {"fused_eligible": True, "block_bytes": 4096}  # single units: never gathered here
  fast = {**_row(32, 0.05, 3.0, 1.0), **units, "fused_ms": 0.5}
  slow = {**_row(32, 0.25, 3.0, 1.0), **units, "fused_ms": 1.5}
  on = dataclasses.replace(_policy.CPU_NATIVE, fused_small_fraction=0.06)
  off = dataclasses.replace(_policy.CPU_NATIVE, fused_small_fraction=0.0)
  assert _policy.batch_mode(on, 32, fast["capacity"], 64, 4096) == "dense"
  assert tune._loss(on, [fast]) == 0.0
  assert tune._loss(off, [fast]) == pytest.approx(math.log(1.0 / 0.5))
  (p,) = tune.fit([fast, slow], "cpu", "test cpu")
  assert fast["fraction"] <= p.fused_small_fraction < slow["fraction"]
  assert tune._loss(p, [fast, slow]) == 0.0
