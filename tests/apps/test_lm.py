"""End-to-end test of ``lrcc-jax lm`` on a tiny model and a few small text files."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lrcc_jax.apps import lm

TINY = lm.LMConfig(
    d_model=32, n_layers=2, n_heads=2, d_ff=64, context=16, batch_size=4, steps=4,
    warmup=2, log_every=2, checkpoint_every=2, ranks=(4,), recalls=(0.9,), eval_windows=8,
    calib_windows=8, latency_repeats=1, decode_widths=(32, 64), ffn_l1=0.01,
)


@pytest.fixture(scope="module")
def text_root(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("text")
  for i in range(4):
    (root / f"m{i}.py").write_text(
        "".join(f"def f{i}_{j}(x):\n  return x * {j} + {i}\n" for j in range(30)))
  return root


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, text_root):
  workdir = tmp_path_factory.mktemp("lm")
  return workdir, lm.run(TINY, workdir, progress=False, text_root=text_root)


def test_json_fields(first_run):
  workdir, result = first_run
  saved = json.loads((workdir / "lm.json").read_text())
  assert (workdir / "lm.png").stat().st_size > 0
  assert saved["training"]["steps"] == TINY.steps and saved["training"]["resumed_from"] is None
  assert saved["data"]["train_files"] == 3 and saved["data"]["test_files"] == 1
  rows = saved["conditional"]
  assert {(r["method"], r["rank"], str(r["threshold"]), r["recall"]) for r in rows} == {
      (m, r, t, c) for m in ("svd", "data_aware") for r in TINY.ranks
      for t, c in (("0.0", None), ("calibrated", 0.9))}
  for r in rows:
    assert len(r["layers"]) == TINY.n_layers
    for layer in r["layers"]:
      assert 0.0 <= layer["density"] <= 1.0 and 0.0 <= layer["computed_fraction"] <= 1.0
      assert layer["flop_model_speedup"] > 0
    assert np.isfinite(r["bits_per_byte"])
  assert 0 < saved["dense_bits_per_byte"] < 8.5
  lat = saved["decode_latency"]
  assert lat["dense_ms"] > 0 and lat["skip_gather_ms"] > 0 and lat["speedup_auto"] > 0
  assert len(lat["auto_gathers"]) == len(lat["capacities"]) == TINY.n_layers
  assert lat["max_abs_logit_diff_gather_vs_dense"] < 1e3
  assert "overhead" in lat["note"]
  assert [w["d_model"] for w in lat["widths"]] == [32, 64]
  for w in lat["widths"]:
    assert w["d_ff"] == 2 * w["d_model"] and w["dense_ms"] > 0 and w["skip_gather_ms"] > 0
    assert w["max_abs_logit_diff_gather_vs_dense"] < 1e3 and w["ffn_flop_model_speedup"] > 0
    assert not any(w["auto_gathers"])  # far below MIN_GATHER_WEIGHT_BYTES: "auto" runs dense
  assert "gather_pays_from_d_model" in lat
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [2, 4]
  assert all(0 < l["ffn_density"] <= 1 and l["ffn_l1"] > 0 for l in lines)
  assert result["target"]["reached"] in (True, False)


def test_full_rank_negative_threshold_equals_dense(first_run, text_root):
  workdir, result = first_run
  cfg = TINY
  model, _ = lm.train(cfg, workdir, lm.read_bytes(lm.stdlib_files(text_root)), progress=False)
  rng = np.random.default_rng(0)
  test = lm.windows(lm.read_bytes(lm.stdlib_files(text_root)), 8, cfg.context + 1, rng)
  dense, calib = lm.bits_per_byte(model, test, "dense")
  row = lm.evaluate_setting(model, cfg, test, calib, method="svd", rank=cfg.d_model, threshold=-1e9)
  assert row["bits_per_byte"] == pytest.approx(dense, abs=1e-5)
  assert all(l["computed_fraction"] == 1.0 for l in row["layers"])
  row = lm.evaluate_setting(model, cfg, test, calib, method="svd", rank=4, threshold=1e9)
  assert abs(row["bits_per_byte"] - dense) > 1e-3  # nothing computed: must differ


def test_decode_step_matches_forward(first_run, text_root):
  workdir, _ = first_run
  model, _ = lm.train(TINY, workdir, np.zeros(100, np.uint8), progress=False)
  tokens = np.arange(10, dtype=np.int32) * 7 % 256
  want, _ = model(jnp.asarray(tokens)[None], "dense")
  w = lm._weights(model)
  ffns = [{"w_in": b.ffn.w_in[...], "b_in": b.ffn.b_in[...], "w_out": b.ffn.w_out[...],
           "b_out": b.ffn.b_out[...]} for b in model.blocks]
  cache = jnp.zeros((TINY.n_layers, 2, TINY.context, TINY.n_heads, TINY.d_model // TINY.n_heads))
  for pos, t in enumerate(tokens):
    logits, cache = lm.decode_step(w, ffns, lm._dense_ffn, cache, jnp.int32(t), jnp.int32(pos))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want[0, pos]), atol=1e-4, rtol=1e-4)


def test_rerun_resumes(first_run, text_root):
  workdir, result = first_run
  again = lm.run(TINY, workdir, progress=False, text_root=text_root)
  assert again["training"]["resumed_from"] == TINY.steps
  assert again["dense_bits_per_byte"] == pytest.approx(result["dense_bits_per_byte"], abs=1e-6)
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 2
  with pytest.raises(ValueError, match="steps"):
    lm.run(lm.LMConfig(**{**TINY.__dict__, "steps": 5}), workdir, progress=False, text_root=text_root)


def test_pays_from_is_the_narrowest_width_that_pays_at_every_wider_one():
  rows = lambda *xs: [{"d_model": 2**i, "s": x} for i, x in enumerate(xs)]
  assert lm.pays_from(rows(0.5, 1.2, 0.9, 1.5, 3.0), "s") == 8
  assert lm.pays_from(rows(0.5, 0.9), "s") is None
  assert lm.pays_from(rows(1.1, 2.0), "s") == 1


def test_l1_penalty_is_the_mean_relu_before_squaring(first_run, text_root):
  workdir, _ = first_run
  model, _ = lm.train(TINY, workdir, np.zeros(100, np.uint8), progress=False)
  batch = jnp.asarray(np.arange(2 * 17).reshape(2, 17) % 256, jnp.int32)
  loss0, parts0 = lm.training_loss(model, batch, 0.0)
  loss1, parts1 = lm.training_loss(model, batch, 0.5)
  _, hs = model(batch[:, :-1])
  want = sum(float(jnp.mean(jnp.maximum(h @ b.ffn.w_in[...] + b.ffn.b_in[...][None, None], 0)))
             for b, h in zip(model.blocks, hs))
  assert float(parts0["ffn_l1"]) == pytest.approx(want, rel=1e-5)
  assert float(loss0) == pytest.approx(float(parts0["cross_entropy"]), rel=1e-6)
  assert float(loss1) == pytest.approx(float(parts1["cross_entropy"]) + 0.5 * want, rel=1e-5)
