"""Every ```python block of README.md runs as written, top to bottom, in a fresh interpreter."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run_as_written(tmp_path):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
  assert len(blocks) >= 2
  script = tmp_path / "readme_blocks.py"
  script.write_text("\n".join(f"# --- README block {i}\n{b}" for i, b in enumerate(blocks, 1)))
  done = subprocess.run(
      [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "recall" in done.stdout and "available" in done.stdout


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
  text = README.read_text(encoding="utf-8")
  first = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
  run, test = [l for l in first.splitlines() if l and not l.startswith("#")]
  assert run.endswith("lrcc-jax demo") and test.endswith("pytest -q -n 2")
  ci = (README.parent / ".ci" / "run").read_text()
  assert test in ci
