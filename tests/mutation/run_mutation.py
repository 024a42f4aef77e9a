"""Mutation testing of the functional core: does the test suite notice small code changes?

A self-written runner (mutmut 3 copies the package into `mutants/` and trampolines every
function, which does not combine with jit-traced code in the time this needed). It applies
classic operators one at a time and runs a fast test subset against each mutant; a mutant
is *killed* when a test fails (or it times out), and *survives* when every test passes.

Speed: a fresh pytest process per mutant spends most of its time importing JAX and
compiling the same small XLA ops again (over 2 minutes per mutant). Instead each worker is
one long-lived process: it executes the mutated module's source into the loaded module
(functions replaced wherever they were imported, class bodies patched in place), runs the
subset with `pytest.main` in-process, and restores the original. The repository files are
never modified.

Operators (one token per mutant):
  comparisons   <  <=  >  >=  ==  !=   (strictness flips and negations)
  arithmetic    +  -  (binary and unary), * -> /, // -> /
  logic         ~x -> x, and <-> or, True <-> False
  numbers       integer n -> n + 1, float x -> -x (0.0 -> 1.0)
  functions     max <-> min, maximum <-> minimum, argmax <-> argmin, isnan -> isinf
  gradients     lax.stop_gradient(e) -> e
  infinities    jnp.inf -> -jnp.inf

Not mutated: docstrings, comments and strings, and the module-level UPPER_CASE tuning
constants (`MAX_GATHER_*`, `NATIVE_*`, `BISECT_MIN_*`, `GATHER_GROUPS`, ...): they only pick
between paths that return the same values, so their mutants are equivalent by design.

Usage (from the repository root; see tests/mutation_report.md):
  python tests/mutation/run_mutation.py --jobs 2 --budget 2400 --out /tmp/mutation.json
  python tests/mutation/run_mutation.py --list          # the mutants, no test runs
  python tests/mutation/run_mutation.py --only _mask.py:12  # one mutant by module:index
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import pathlib
import re
import subprocess
import sys
import time
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Module -> the fast test subset that must kill its mutants, cheapest broad tests first
# (`-x` stops at the first failure; a repeated test id runs once more only for survivors).
TARGETS = {
    "_mask.py": [
        "tests/test_mask.py::test_unit_mask_equals_numpy_reference_on_integer_layers",
        "tests/test_mask.py::test_nan_block_ranks_first_under_a_binding_capacity",
        "tests/test_mask.py::test_score_equal_to_threshold_is_not_selected",
        "tests/test_mask.py", "tests/test_layers.py",
    ],
    "_layers.py": [
        "tests/test_mask.py::test_unit_mask_defaults_are_threshold_zero_no_capacity_single_units",
        "tests/test_layers.py::test_conditional_dense_equals_numpy_reference_at_the_edges",
        "tests/test_layers.py",
    ],
    "_packed.py": [
        "tests/test_packed.py::test_every_packed_path_equals_numpy_reference_at_the_edges",
        "tests/test_packed.py::test_packed_path_gradients_equal_masked_reference",
        "tests/test_packed.py",
    ],
    "_sparse.py": [
        "tests/test_sparse.py::test_sparse_chain_equals_numpy_reference_at_the_edges",
        "tests/test_sparse.py",
    ],
    "_estimator.py": ["tests/test_estimator.py"],
    "_stats.py": ["tests/test_stats.py"],
}

SWAP_OPS = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==",
            "+": "-", "-": "+", "*": "/", "//": "/"}
SWAP_NAMES = {"max": "min", "min": "max", "maximum": "minimum", "minimum": "maximum",
              "argmax": "argmin", "argmin": "argmax", "and": "or", "or": "and",
              "True": "False", "False": "True", "isnan": "isinf"}
CONSTANT = re.compile(r"^[A-Z][A-Z0-9_]*\s*(:[^=]*)?=")
STOP_GRADIENT = re.compile(r"(?:jax\.)?(?:lax\.)?stop_gradient\(")


def _offsets(source):
  starts, pos = [0], 0
  for line in source.splitlines(keepends=True):
    pos += len(line)
    starts.append(pos)
  return starts


def mutants(path: pathlib.Path):
  """[(line, description, mutated source)] for one module."""
  source = path.read_text()
  lines = source.splitlines()
  starts = _offsets(source)
  out = []

  def replace(tok_start, tok_end, new, what):
    a = starts[tok_start[0] - 1] + tok_start[1]
    b = starts[tok_end[0] - 1] + tok_end[1]
    mutated = source[:a] + new + source[b:]
    try:
      compile(mutated, str(path), "exec")
    except SyntaxError:
      return
    out.append((tok_start[0], what, mutated))

  tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
  for i, tok in enumerate(tokens):
    if tok.start[0] > len(lines):
      break  # ENDMARKER
    line = lines[tok.start[0] - 1]
    if CONSTANT.match(line) or line.lstrip().startswith(("import ", "from ", "@")):
      continue
    prev = tokens[i - 1] if i else None
    if tok.type == tokenize.OP and tok.string in SWAP_OPS:
      if tok.string == "*" and prev is not None and prev.string in ("(", ",", "*"):
        continue  # *args unpacking, not a product
      replace(tok.start, tok.end, SWAP_OPS[tok.string], f"{tok.string!r} -> {SWAP_OPS[tok.string]!r}")
    elif tok.type == tokenize.OP and tok.string == "~":
      replace(tok.start, tok.end, "", "'~' removed")
    elif tok.type == tokenize.NAME and tok.string in SWAP_NAMES:
      replace(tok.start, tok.end, SWAP_NAMES[tok.string], f"{tok.string} -> {SWAP_NAMES[tok.string]}")
    elif tok.type == tokenize.NAME and tok.string == "inf" and prev is not None and prev.string == ".":
      owner = tokens[i - 2]
      replace(owner.start, tok.end, f"(-{owner.string}.inf)", f"{owner.string}.inf -> -{owner.string}.inf")
    elif tok.type == tokenize.NUMBER:
      text = tok.string
      try:
        value = int(text, 0)
        new = str(value + 1)
      except ValueError:
        value = float(text)
        new = "1.0" if value == 0 else f"(-{text})"
      replace(tok.start, tok.end, new, f"{text} -> {new}")
  for m in STOP_GRADIENT.finditer(source):
    line_no = source.count("\n", 0, m.start()) + 1
    mutated = source[:m.start()] + "(lambda _e: _e)(" + source[m.end():]
    out.append((line_no, "stop_gradient removed", mutated))
  return out


def _worker(jobs, timeout, out_path):
  """Runs `jobs` in this process (see the module docstring); appends JSON lines to out_path."""
  import importlib
  import signal
  import types

  import pytest

  sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
  os.environ["HYPOTHESIS_PROFILE"] = "mutation"
  os.chdir(ROOT)
  import lrcc_jax  # noqa: F401

  def holders():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name.startswith("lrcc_jax") or name.startswith("test_") or name == "helpers")]

  class Timeout(Exception):
    pass

  def on_alarm(*_):
    raise Timeout()

  signal.signal(signal.SIGALRM, on_alarm)
  base = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "--no-header", "-o", "addopts="]
  for module, index, line, what, mutated in jobs:
    mod = importlib.import_module(f"lrcc_jax.{module[:-3]}")
    old = dict(vars(mod))
    new_ns = dict(old)
    swaps, class_patches = {}, []
    t0 = time.time()
    try:
      exec(compile(mutated, mod.__file__, "exec"), new_ns)
      for name, value in new_ns.items():
        prev = old.get(name)
        if isinstance(prev, types.FunctionType) and isinstance(value, types.FunctionType) and prev is not value:
          swaps[id(prev)] = (prev, value)
        elif isinstance(prev, type) and isinstance(value, type) and prev is not value:
          for attr, v in vars(value).items():
            if isinstance(v, (types.FunctionType, property, staticmethod, classmethod)):
              class_patches.append((prev, attr, prev.__dict__.get(attr), v))
          new_ns[name] = prev  # keep the original class object (isinstance, pytrees)
        elif not isinstance(prev, (type, types.ModuleType)) and name not in ("__builtins__",):
          setattr(mod, name, value)
      for holder in holders():
        for name, value in list(vars(holder).items()):
          if id(value) in swaps and swaps[id(value)][0] is value:
            setattr(holder, name, swaps[id(value)][1])
      for cls, attr, _, v in class_patches:
        setattr(cls, attr, v)
      for prev, value in swaps.values():  # the new functions see the original classes
        value.__globals__.update({k: v for k, v in old.items() if isinstance(v, type)})
      signal.alarm(int(timeout))
      failed = []

      class Collector:
        def pytest_runtest_logreport(self, report):
          if report.failed:
            failed.append(report.nodeid)

      rc = pytest.main(base + TARGETS[module], plugins=[Collector()])
      signal.alarm(0)
      status = "survived" if rc == 0 else "killed"
      killer = failed[0] if failed else f"pytest exit {int(rc)}"
    except Timeout:
      status, killer = "killed", "timeout"
    except Exception as err:  # noqa: BLE001  # the mutant does not even import
      signal.alarm(0)
      status, killer = "killed", f"import: {type(err).__name__}: {err}"[:200]
    finally:
      signal.alarm(0)
      for holder in holders():
        for name, value in list(vars(holder).items()):
          for prev, repl in swaps.values():
            if value is repl:
              setattr(holder, name, prev)
      for cls, attr, prev_attr, _ in class_patches:
        if prev_attr is None:
          delattr(cls, attr)
        else:
          setattr(cls, attr, prev_attr)
      for name, value in old.items():
        setattr(mod, name, value)
    result = dict(module=module, index=index, line=line, mutation=what, status=status,
                  seconds=round(time.time() - t0, 1), killer=killer)
    with open(out_path, "a") as f:
      f.write(json.dumps(result) + "\n")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--modules", nargs="*", default=list(TARGETS))
  ap.add_argument("--jobs", type=int, default=2)
  ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant (a timeout kills it)")
  ap.add_argument("--budget", type=float, default=3600.0, help="total seconds; later mutants are left untested")
  ap.add_argument("--out", default="/tmp/lrcc_mutation.json")
  ap.add_argument("--list", action="store_true")
  ap.add_argument("--only", nargs="*", default=None, help="module:index pairs")
  ap.add_argument("--interleave", action="store_true", help="order the mutants round robin over the modules")
  ap.add_argument("--resume", action="store_true", help="skip mutants already in the --out.N files")
  ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()

  jobs = []
  for module in args.modules:
    for index, (line, what, mutated) in enumerate(mutants(ROOT / "lrcc_jax" / module)):
      if args.only is None or f"{module}:{index}" in args.only:
        jobs.append((module, index, line, what, mutated))
  all_jobs = list(jobs)
  if args.interleave:  # round robin over the modules: a bounded budget samples every module
    by_module = [[j for j in jobs if j[0] == m] for m in args.modules]
    jobs = [j for group in itertools.zip_longest(*by_module) for j in group if j is not None]
  if args.resume:
    done = set()
    for k in range(args.jobs):
      f = pathlib.Path(args.out + f".{k}")
      if f.exists():
        done |= {(r["module"], r["index"]) for r in map(json.loads, f.read_text().splitlines()) if r}
    jobs = [j for j in jobs if (j[0], j[1]) not in done]
  if args.list:
    for module, index, line, what, _ in jobs:
      print(f"{module}:{index}\tline {line}\t{what}")
    print(f"{len(jobs)} mutants")
    return
  plan = pathlib.Path(args.out + ".plan")
  if args.worker is not None:  # internal: one worker process, on the parent's plan
    keys = json.loads(plan.read_text())
    by_key = {f"{j[0]}:{j[1]}": j for j in all_jobs}
    mine = [by_key[k] for n, k in enumerate(keys) if n % args.jobs == args.worker]
    _worker(mine, args.timeout, args.out + f".{args.worker}")
    return
  plan.write_text(json.dumps([f"{j[0]}:{j[1]}" for j in jobs]))
  for k in range(args.jobs if not args.resume else 0):
    pathlib.Path(args.out + f".{k}").unlink(missing_ok=True)
  procs = [
      subprocess.Popen([sys.executable, __file__, "--worker", str(k), *sys.argv[1:]],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
      for k in range(args.jobs)
  ]
  deadline = time.time() + args.budget
  try:
    while any(p.poll() is None for p in procs) and time.time() < deadline:
      time.sleep(5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.terminate()
  results = []
  for k in range(args.jobs):
    f = pathlib.Path(args.out + f".{k}")
    if f.exists():
      results += [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
  seen = {(r["module"], r["index"]) for r in results}
  results += [dict(module=m, index=i, line=l, mutation=w, status="untested")
              for m, i, l, w, _ in jobs if (m, i) not in seen]
  results.sort(key=lambda r: (list(TARGETS).index(r["module"]), r["index"]))
  pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
  for r in results:
    if r["status"] != "killed":
      print(f"{r['status']:8s} {r['module']}:{r['index']} line {r['line']}: {r['mutation']}")
  counts = {s: sum(r["status"] == s for r in results) for s in ("killed", "survived", "untested")}
  print(json.dumps(counts))


if __name__ == "__main__":
  main()
