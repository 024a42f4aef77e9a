"""Executes experiments/colab.ipynb on CPU: tiny mnist config, mocked TFDS data, no install.

The notebook reads its parameters from ``LRCC_NOTEBOOK_*`` environment variables. The
kernel is this interpreter (a kernelspec written to a temporary ``JUPYTER_PATH``), so the
test does not depend on which kernels the machine has installed.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "experiments" / "colab.ipynb"

TINY_MNIST = """
import dataclasses

from lrcc_jax.apps import sweep

_train, _sweep = sweep.load_config({mnist!r})


def get_config():
  return dataclasses.replace(
      _train, hidden_sizes=(16, 8), batch_size=16, epochs=1, data_dir={data_dir!r}
  )


def get_sweep_config():
  return dataclasses.replace(
      _sweep, protocols=("dense",), estimators=("svd",), calibration_rows=32, bench_repeats=1
  )
"""


def _kernelspec(root: pathlib.Path) -> str:
  name = "lrcc-notebook-test"
  spec_dir = root / "kernels" / name
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "lrcc test kernel",
      "language": "python",
  }))
  return name


def test_notebook_runs_the_mnist_sweep_on_mock_data(tmp_path, monkeypatch):
  config = tmp_path / "tiny_mnist.py"
  config.write_text(TINY_MNIST.format(
      mnist=str(REPO / "experiments" / "configs" / "mnist.py"), data_dir=str(tmp_path / "tfds")
  ))
  out, workdir = tmp_path / "results", tmp_path / "runs"
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
  monkeypatch.setenv("LRCC_NOTEBOOK_MOCK", "1")
  monkeypatch.setenv("LRCC_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("LRCC_NOTEBOOK_MOCK_EXAMPLES", "48")
  monkeypatch.setenv("LRCC_NOTEBOOK_CONFIG", str(config))
  monkeypatch.setenv("LRCC_NOTEBOOK_OUT", str(out))
  monkeypatch.setenv("LRCC_NOTEBOOK_WORKDIR", str(workdir))
  kernel = _kernelspec(tmp_path / "jupyter")

  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(REPO)}}
  )
  client.execute()

  payload = json.loads((out / "sweep_mnist_quick.json").read_text())
  rows = payload["rows"]
  # dense protocol x svd x quick ranks (2, full) x thresholds (0, calibrated).
  assert len(rows) == 4 and {r["dataset"] for r in rows} == {"mnist"}
  for suffix in ("error", "recall", "speedup"):
    assert (out / f"sweep_mnist_quick_{suffix}.png").exists()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "MOCK: using the installed lrcc_jax" in text
  assert "jax " in text and "device(s)" in text
  assert not [o for o in outputs if o.get("output_type") == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 3
  markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
  assert markdown and markdown[0].startswith("| protocol")
