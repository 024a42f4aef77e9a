"""Strict numerics for every test: silent broadcasting bugs die early (equinox style)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# Start the CPU client now, with JAX's default (asynchronous) dispatch: commands run
# in-process (`cli.main(["bench", ...])`) then cannot switch it, whatever the test order.
jax.devices()

import hypothesis  # noqa: E402

# Hypothesis profiles, picked with the environment variable HYPOTHESIS_PROFILE:
#
# - "ci" (the default): 60 examples per property, derandomized, so every run of the suite
#   draws the same examples (a failure reproduces on rerun and in CI). `print_blob` prints
#   the `@reproduce_failure(...)` blob of a failing example, and `report_multiple_bugs`
#   is off so the shrunk example shown is the one that failed first.
# - "dev": for local runs hunting for new failures, e.g.
#   `HYPOTHESIS_PROFILE=dev pytest -n 2 tests/test_mask.py tests/test_packed.py`:
#   500 examples from a fresh random seed on every run (printed with the failure via
#   `--hypothesis-seed`/the blob), with the example database on so a found failure replays
#   first on the next run. Pass `--hypothesis-seed=N` to pytest to repeat a dev run.
#
# Costly properties scale their example count from the loaded profile (`scaled_examples`).
hypothesis.settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, print_blob=True,
    report_multiple_bugs=False, database=None,
)
hypothesis.settings.register_profile(
    "dev", max_examples=500, deadline=None, derandomize=False, print_blob=True,
    report_multiple_bugs=False,
)
# "mutation": what tests/mutation/run_mutation.py runs against every mutant (fast, fixed).
hypothesis.settings.register_profile(
    "mutation", max_examples=10, deadline=None, derandomize=True, print_blob=False, database=None,
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # no shrinking: any failure kills
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config):
  profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
  return f"hypothesis profile: {profile} (max_examples={hypothesis.settings.default.max_examples})"
