"""The README's results table is the one rendered from the committed JSON."""

import json
import pathlib
import shutil

import pytest

from lrcc_jax.apps import report

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"


def test_readme_table_is_rendered_from_the_committed_results():
  assert report.main(["--check", str(ROOT / "README.md"), "--results", str(RESULTS)]) == 0


def test_a_changed_result_makes_the_readme_stale_and_write_mends_it(tmp_path):
  results = tmp_path / "results"
  shutil.copytree(RESULTS, results, ignore=shutil.ignore_patterns("*.png"))
  layer = json.loads((results / "bench_layer.json").read_text())
  row = report._pick(layer["rows"], batch=1, capacity_fraction=0.1, block_size=16)
  row["measured_speedup"] = 123.4
  (results / "bench_layer.json").write_text(json.dumps(layer))
  readme = tmp_path / "README.md"
  shutil.copy(ROOT / "README.md", readme)
  before = readme.read_text()
  assert report.main(["--check", str(readme), "--results", str(results)]) == 1
  assert readme.read_text() == before  # --check never writes
  assert report.main(["--write", str(readme), "--results", str(results)]) == 0
  assert "**123.4×**" in readme.read_text()
  assert report.main(["--check", str(readme), "--results", str(results)]) == 0


def test_missing_markers_and_ambiguous_rows_are_errors():
  with pytest.raises(ValueError, match="markers"):
    report.replace_block("no markers here", "table")
  with pytest.raises(ValueError, match="found 2"):
    report._pick([{"a": 1}, {"a": 1}], a=1)
