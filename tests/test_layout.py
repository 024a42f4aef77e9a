"""The architecture as tests: the core needs jax and numpy only, and never imports upward."""

import ast
import pathlib
import subprocess
import sys

import lrcc_jax

PACKAGE = pathlib.Path(lrcc_jax.__file__).parent
CORE = sorted(p for p in PACKAGE.glob("_*.py") if p.name != "__init__.py")


def _imports(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def test_core_modules_never_import_the_modules_or_the_applications():
  assert len(CORE) >= 10
  for path in CORE:
    bad = {n for n in _imports(path) if n.startswith(("lrcc_jax.apps", "lrcc_jax.nn", "flax", "orbax"))}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_modules_never_import_the_applications():
  for path in (PACKAGE / "nn").glob("*.py"):
    bad = {n for n in _imports(path) if n.startswith("lrcc_jax.apps")}
    assert not bad, f"nn/{path.name} imports {sorted(bad)}"


def test_importing_the_core_loads_no_application_dependency():
  code = (
      "import sys, lrcc_jax; "
      "print(sorted({m.split('.')[0] for m in sys.modules} & "
      "{'flax', 'optax', 'orbax', 'tqdm', 'mlxtend', 'matplotlib', 'tensorflow_datasets', 'grain'}))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_every_public_name_is_listed_for_type_checkers_and_resolves():
  """The lazy `_EXPORTS` table and the `TYPE_CHECKING` re-exports name the same objects."""
  tree = ast.parse((PACKAGE / "__init__.py").read_text())
  block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
  typed = {}
  for node in block.body:
    assert isinstance(node, ast.ImportFrom) and node.module.startswith("lrcc_jax._"), ast.dump(node)
    for alias in node.names:
      assert alias.asname is not None, f"{alias.name} is not re-exported as `x as x`"
      typed[alias.asname] = (node.module, alias.name)
  assert typed == lrcc_jax._EXPORTS
  for name in lrcc_jax.__all__:
    assert getattr(lrcc_jax, name) is not None
