"""Applications built on the lrcc-jax core: data, training, checkpoints, evaluation, sweeps,
benchmarks and the ``lrcc-jax`` command line.

The functional core (``lrcc_jax``) and the Flax modules (``lrcc_jax.nn``) never import this
package; it imports them. Its extra dependencies (orbax, tqdm, mlxtend, TFDS, grain,
matplotlib) come with the ``experiments`` extra: ``pip install "lrcc-jax[experiments]"``.
"""
