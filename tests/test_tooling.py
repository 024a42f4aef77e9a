"""Lint, format and type checks over the package, run by the test command (and so by CI)."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent


def _tool(name: str) -> str:
  path = BIN / name
  if path.exists():
    return str(path)
  found = shutil.which(name)
  if found is None:
    pytest.fail(f"{name} is not installed: it is part of the test extra (pip install -e '.[test]').")
  return found


@pytest.mark.parametrize(
    "args",
    [["ruff", "check", "lrcc_jax"], ["ruff", "format", "--check", "lrcc_jax"], ["mypy"]],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_tool_is_clean(args):
  done = subprocess.run([_tool(args[0]), *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
