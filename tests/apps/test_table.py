import pytest

from lrcc_jax.apps.table import format_table


def test_text_and_markdown():
  text = format_table(["a", "num"], [["x", "1.5"], ["long", "10.25"]], right=[False, True],
                      legend=["num: a number"])
  lines = text.splitlines()
  assert lines[0] == "a       num" and lines[1] == "----  -----"
  assert lines[2] == "x       1.5" and lines[3] == "long  10.25"
  assert lines[-1] == "num: a number" and lines[-2] == ""
  md = format_table(["a", "num"], [["x", "1"]], markdown=True, right=[False, True])
  assert md.splitlines() == ["| a | num |", "|---|---:|", "| x | 1 |"]
  with pytest.raises(ValueError, match="2 cells but the header has 3"):
    format_table(["a", "b", "c"], [["1", "2"]])
