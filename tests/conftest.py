"""Strict numerics for every test: silent broadcasting bugs die early (equinox style)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# Start the CPU client now, with JAX's default (asynchronous) dispatch: commands run
# in-process (`cli.main(["bench", ...])`) then cannot switch it, whatever the test order.
jax.devices()

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "lrcc", max_examples=40, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile("lrcc")
