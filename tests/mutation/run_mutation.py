"""Mutation testing of the functional core: does the test suite notice small code changes?

A self-written runner (mutmut 3 copies the package into `mutants/` and trampolines every
function, which does not combine with jit-traced code in the time this needed). It applies
classic operators one at a time to a temporary copy of the repository and runs a fast test
subset against each mutant; a mutant is *killed* when a test fails (or the run times out),
and *survives* when every test passes.

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
import concurrent.futures
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Module -> the fast test subset that must kill its mutants.
TARGETS = {
    "_mask.py": ["tests/test_mask.py", "tests/test_layers.py"],
    "_layers.py": ["tests/test_layers.py"],
    "_packed.py": ["tests/test_packed.py"],
    "_sparse.py": ["tests/test_sparse.py"],
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


def _run_one(module, index, line, what, mutated, timeout):
  with tempfile.TemporaryDirectory(prefix="lrcc_mut_") as tmp:
    tmp = pathlib.Path(tmp)
    shutil.copytree(ROOT / "lrcc_jax", tmp / "lrcc_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", tmp / "tests", ignore=shutil.ignore_patterns("__pycache__", "mutation", "apps"))
    shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")
    (tmp / "lrcc_jax" / module).write_text(mutated)
    env = dict(os.environ, PYTHONPATH=str(tmp), HYPOTHESIS_PROFILE="mutation",
               PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TARGETS[module]]
    t0 = time.time()
    try:
      done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
      status = "survived" if done.returncode == 0 else "killed"
      tail = done.stdout.strip().splitlines()[-1:] if done.stdout.strip() else []
      if done.returncode not in (0, 1):
        status = "killed"  # collection or import error: the mutant breaks the module
      killer = next((l for l in done.stdout.splitlines() if l.startswith("FAILED ")), "")
    except subprocess.TimeoutExpired:
      status, tail, killer = "killed", ["timeout"], "timeout"
    return dict(module=module, index=index, line=line, mutation=what, status=status,
                seconds=round(time.time() - t0, 1), killer=killer or (tail[0] if tail else ""))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--modules", nargs="*", default=list(TARGETS))
  ap.add_argument("--jobs", type=int, default=2)
  ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant (a timeout kills it)")
  ap.add_argument("--budget", type=float, default=3600.0, help="total seconds; later mutants are left untested")
  ap.add_argument("--out", default="/tmp/lrcc_mutation.json")
  ap.add_argument("--list", action="store_true")
  ap.add_argument("--only", nargs="*", default=None, help="module:index pairs")
  args = ap.parse_args()

  jobs = []
  for module in args.modules:
    for index, (line, what, mutated) in enumerate(mutants(ROOT / "lrcc_jax" / module)):
      if args.only is None or f"{module}:{index}" in args.only:
        jobs.append((module, index, line, what, mutated))
  if args.list:
    for module, index, line, what, _ in jobs:
      print(f"{module}:{index}\tline {line}\t{what}")
    print(f"{len(jobs)} mutants")
    return
  deadline = time.time() + args.budget
  results = []
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = {}
    pending = list(jobs)
    while pending or futures:
      while pending and len(futures) < args.jobs and time.time() < deadline:
        job = pending.pop(0)
        futures[pool.submit(_run_one, *job, args.timeout)] = job
      if not futures:
        break
      done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
      for f in done:
        futures.pop(f)
        r = f.result()
        results.append(r)
        print(f"{r['status']:8s} {r['module']}:{r['index']} line {r['line']}: {r['mutation']}"
              f" ({r['seconds']} s) {r['killer']}", flush=True)
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    untested = [dict(module=m, index=i, line=l, mutation=w, status="untested") for m, i, l, w, _ in pending]
  results += untested
  pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
  counts = {s: sum(r["status"] == s for r in results) for s in ("killed", "survived", "untested")}
  print(json.dumps(counts))


if __name__ == "__main__":
  main()
