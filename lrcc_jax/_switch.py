"""A platform switch resolved when the program is lowered, leaving no conditional behind.

`jax.lax.platform_dependent` stages a `cond` on the platform index. Lowered for one
platform, jax 0.10 still emits it as a `stablehlo.case` on a constant (XLA folds it before
compiling); lowered for several, it lowers *every* kept branch for *every* platform, and a
TPU `pallas_call` has no CUDA or CPU lowering. `platform_switch` is a primitive whose
lowering rule picks the branch per platform (`lower_per_platform`): one platform gets its
branch's ops and nothing else; several get one `case` whose branches are each lowered for
their own platforms only.

Transformations: `vmap` vmaps every branch. The JVP computes the primal with the switch
and the tangent with the default branch: the branches compute one function (the platform
changes only how), and the default branch is the portable one (XLA ops only, in
`_policy.dispatch`), so gradient programs hold no platform kernel in their tangents, no
conditional, and lower for several platforms at once. Without a default branch the tangent
goes through `jax.lax.platform_dependent` (jax's `cond` rules).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
from jax._src.interpreters import (
  mlir as _mlir_internal,  # lower_per_platform: not public
)
from jax.interpreters import ad, batching, mlir

Platforms = tuple[tuple[str, ...] | None, ...]

switch_p = jax.extend.core.Primitive("lrcc_platform_switch")
switch_p.multiple_results = True


def platform_switch(
  branches: Sequence[Callable[..., Any]], platforms: Platforms, *args: Any
) -> Any:
  """`branches[i](*args)` for the platform the program is lowered for.

  Args:
    branches: callables with the same output structure, shapes and dtypes.
    platforms: for each branch the lowering platforms ("cpu", "cuda", "tpu", "rocm") it
      serves, or None for the default branch (at most one, any platform not named; it
      also supplies the derivatives, so it should be portable).
    *args: the branches' arguments (pytrees of arrays; Python scalars become arrays).
      Everything a branch reads must come in here, not through a closure over traced
      values.

  Returns:
    The selected branch's output.
  """
  flat, tree = jax.tree.flatten(args)
  flat = [jnp.asarray(a) for a in flat]
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in flat]
  jaxprs, out_tree = [], None
  for fn in branches:
    closed, shape = jax.make_jaxpr(
      lambda *f, fn=fn: fn(*jax.tree.unflatten(tree, f)), return_shape=True
    )(*specs)
    tree_i = jax.tree.structure(shape)
    if out_tree is not None and (tree_i != out_tree or closed.out_avals != jaxprs[0].out_avals):
      raise TypeError(
        f"platform_switch branches disagree: {jaxprs[0].out_avals} vs {closed.out_avals}."
      )
    jaxprs.append(closed)
    out_tree = tree_i
  outs = switch_p.bind(*flat, branches=tuple(jaxprs), platforms=tuple(platforms))
  return jax.tree.unflatten(out_tree, outs)


def _abstract_eval(*avals, branches, platforms):
  del avals, platforms
  return branches[0].out_avals


def _impl(*args, branches, platforms):
  # Outside jit: stage it, so lowering picks the current platform's branch.
  return jax.jit(functools.partial(switch_p.bind, branches=branches, platforms=platforms))(*args)


def _lowering(ctx, *args, branches, platforms):
  rules, default = {}, None
  for jaxpr, ps in zip(branches, platforms):
    rule = mlir.lower_fun(jax.extend.core.jaxpr_as_fun(jaxpr), multiple_results=True)
    if ps is None:
      default = rule
    else:
      rules.update({p: rule for p in ps})
  return _mlir_internal.lower_per_platform(
    ctx, "lrcc_platform_switch", rules, default, jax.extend.core.no_effects, *args
  )


def _as_platform_dependent(branches, platforms) -> Callable[..., Any]:
  kwargs = {}
  for jaxpr, ps in zip(branches, platforms):
    fn = jax.extend.core.jaxpr_as_fun(jaxpr)
    if ps is None:
      kwargs["default"] = fn
    else:
      kwargs.update({p: fn for p in ps})
  return lambda *args: jax.lax.platform_dependent(*args, **kwargs)


def _jvp(primals, tangents, *, branches, platforms):
  outs = switch_p.bind(*primals, branches=branches, platforms=platforms)
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  if None in platforms:  # the default branch: portable, and the same function
    tangent_fn = jax.extend.core.jaxpr_as_fun(branches[platforms.index(None)])
  else:
    tangent_fn = _as_platform_dependent(branches, platforms)
  _, out_tangents = jax.jvp(tangent_fn, tuple(primals), tuple(tangents))
  return outs, list(out_tangents)


def _batch(args, dims, *, branches, platforms):
  axes = list(dims)  # `None`: not batched (batching.not_mapped)
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  batched = tuple(
    jax.make_jaxpr(jax.vmap(jax.extend.core.jaxpr_as_fun(b), in_axes=axes))(*specs)
    for b in branches
  )
  outs = switch_p.bind(*args, branches=batched, platforms=platforms)
  return outs, [0] * len(outs)


switch_p.def_abstract_eval(_abstract_eval)
switch_p.def_impl(_impl)
mlir.register_lowering(switch_p, _lowering)
ad.primitive_jvps[switch_p] = _jvp
batching.primitive_batchers[switch_p] = _batch
