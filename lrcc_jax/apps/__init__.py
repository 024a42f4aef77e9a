"""Applications built on the lrcc-jax core: data, training, checkpoints, evaluation, sweeps,
benchmarks and the ``lrcc-jax`` command line.

The functional core (``lrcc_jax``) and the Flax modules (``lrcc_jax.nn``) never import this
package; it imports them. Its extra dependencies (orbax, tqdm, mlxtend, TFDS, grain,
matplotlib) come with the ``experiments`` extra: ``pip install "lrcc-jax[experiments]"``.
"""

import importlib.util as _util

_missing = [
  m for m in ("orbax.checkpoint", "tqdm", "mlxtend") if _util.find_spec(m.split(".")[0]) is None
]
if _missing:
  raise ImportError(
    f"lrcc_jax.apps needs {', '.join(_missing)}: install the applications' extra with"
    ' pip install "lrcc-jax[experiments]" (the core, `import lrcc_jax`, does not need them).'
  )
