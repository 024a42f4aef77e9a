"""Joining JAX's multi-controller runtime: one Python process per host, one program.

Under ``jax.distributed.initialize`` every process runs the same script; `jax.devices()`
then lists the devices of *all* processes, `jax.local_devices()` this process's own, and
a jitted function over a global mesh is one SPMD program whose collectives (the gradient
all-reduce of data parallelism) cross the processes. The call must come before anything
starts a JAX backend (even `jax.devices()`), so the CLI makes it first.

`initialize` decides whether to join, and how:

- explicit settings (``--coordinator HOST:PORT --num-processes N --process-id I``) are
  passed on; any left out are auto-detected by JAX (e.g. the process id under SLURM);
- with none, JAX's auto-detection runs only where `detect_cluster` finds an environment
  that provides it (a Cloud TPU VM, a SLURM or Open MPI job of several tasks), because on
  a plain machine it fails after its own probing, or waits for peers that never come;
- otherwise, and for ``--num-processes 1``, the run stays single-process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax

logger = logging.getLogger(__name__)


def _int(environ: Mapping[str, str], key: str) -> int:
  try:
    return int(environ.get(key, ""))
  except ValueError:
    return 0


def _on_cloud_tpu_vm() -> bool:
  # Set by `import jax` when libtpu finds TPU chips (JAX's own TPU-VM check); private,
  # hence the guard: a JAX without it simply never auto-detects a TPU VM.
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
  """Names the multi-process environment this process runs in, or None.

  Only environments in which ``jax.distributed.initialize()`` can find every setting by
  itself, and only when they hold more than one process (a one-task SLURM job is a
  single-process run):

  - ``"tpu"``: a Cloud TPU VM (TPU pod slices; JAX reads the slice's workers from the
    metadata server or, on GKE, ``TPU_WORKER_HOSTNAMES``);
  - ``"slurm"``: ``srun`` with ``SLURM_NTASKS > 1`` (JAX's variables all present);
  - ``"ompi"``: ``mpirun`` (Open MPI) with ``OMPI_COMM_WORLD_SIZE > 1``.

  Args:
    environ: the environment; defaults to `os.environ`.
  """
  environ = os.environ if environ is None else environ
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(k in environ for k in slurm) and _int(environ, "SLURM_NTASKS") > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in environ and _int(environ, "OMPI_COMM_WORLD_SIZE") > 1:
    return "ompi"
  if _on_cloud_tpu_vm() and "TPU_SKIP_MDS_QUERY" not in environ:
    return "tpu"
  return None


def initialize(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  environ: Mapping[str, str] | None = None,
) -> bool:
  """Joins the multi-process runtime when asked to or when the environment provides it.

  Args:
    coordinator: ``HOST:PORT`` of process 0's coordinator service (process 0 binds the
      port, the others connect to it).
    num_processes: processes in the run; 1 (with no `coordinator`) means single-process.
    process_id: this process's index in ``[0, num_processes)``.
    environ: the environment for `detect_cluster`; defaults to `os.environ`.

  Returns:
    True if ``jax.distributed.initialize`` was called (now or before), False for a
    single-process run.

  Raises:
    ValueError: for an inconsistent `process_id` / `num_processes`.
    RuntimeError: from JAX, if a backend was started before this call, or if the
      coordinator cannot be reached in time.
  """
  if jax.distributed.is_initialized():
    return True
  explicit = (coordinator, num_processes, process_id)
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes={num_processes} must be >= 1.")
  too_big = num_processes is not None and process_id is not None and process_id >= num_processes
  if process_id is not None and (process_id < 0 or too_big):
    raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes}).")
  if all(v is None for v in explicit):
    cluster = detect_cluster(environ)
    if cluster is None:
      return False
    logger.info("Detected a %s multi-process environment; joining it.", cluster)
  elif coordinator is None and num_processes == 1:
    return False
  jax.distributed.initialize(
    coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
  )
  logger.info(
    "Process %d of %d: %d local device(s), %d in all.",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def is_primary() -> bool:
  """True in the process that writes run files (process 0), and in single-process runs."""
  return jax.process_index() == 0
