"""Turning logical axis names into shardings: parameters, batches, activations, initialisation.

Parameters carry logical names through `nn.with_logical_partitioning` (flax
`LogicallyPartitioned` boxes); `logical_shardings` maps a tree of such boxes (real or from
`jax.eval_shape`) to a tree of `NamedSharding`s through a rules table. `init_sharded` follows the
Flax lm1b recipe: abstract init -> shardings -> `jax.jit(init, out_shardings=...)`, so no
parameter is ever materialised whole on one device.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.sharding.rules import DEFAULT_RULES, Rules, validate_rules

log = logging.getLogger(__name__)


def _is_box(x: Any) -> bool:
    return isinstance(x, meta.Partitioned)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh, where: str) -> P:
    """Drops mesh axes that do not divide their dimension (that dimension is then replicated).

    jit refuses shardings that split a dimension unevenly, and small models meet this often
    (e.g. 2 kv heads on a tensor axis of 4); replicating is always correct, so it is logged
    rather than raised.
    """
    entries = []
    for dim, axes in enumerate(spec):
        if axes is None:
            entries.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        kept, size = [], 1
        for axis in axes_t:
            if axis not in mesh.shape:
                continue
            if shape[dim] % (size * mesh.shape[axis]) == 0:
                kept.append(axis)
                size *= mesh.shape[axis]
            elif mesh.shape[axis] > 1:
                log.warning(
                    "%s: dim %d of size %d not divisible by mesh axis %s=%d; not sharded on it",
                    where,
                    dim,
                    shape[dim],
                    axis,
                    mesh.shape[axis],
                )
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*entries)


def logical_to_spec(names: tuple[str | None, ...], rules: Rules | None = None) -> P:
    """PartitionSpec for one array from its logical axis names (unknown names: replicated)."""
    rules = DEFAULT_RULES if rules is None else validate_rules(rules)
    return nn.logical_to_mesh_axes(names, rules)


def logical_shardings(tree: Any, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> Any:
    """NamedSharding for every leaf of a (boxed) variables tree.

    Args:
      tree: variables as returned by `Module.init` or `jax.eval_shape(module.init, ...)`:
        leaves wrapped in `nn.LogicallyPartitioned` (logical names, mapped through `rules`) or
        `nn.Partitioned` (mesh axis names, used as given); plain leaves are replicated.
      mesh: the device mesh (see `make_mesh`).
      rules: logical axis rules; None = DEFAULT_RULES.

    Returns:
      The same tree with boxes removed (structure of `nn.meta.unbox(tree)`) and every leaf
      replaced by a NamedSharding. Mesh axes that do not divide a dimension are dropped.
    """
    rules = DEFAULT_RULES if rules is None else validate_rules(rules)

    def one(path, leaf):
        where = jax.tree_util.keystr(path)
        if isinstance(leaf, nn.LogicallyPartitioned):
            spec = nn.logical_to_mesh_axes(leaf.names, leaf.rules or rules)
            shape = np.shape(leaf.value)
        elif _is_box(leaf):
            spec = P(*leaf.names)
            shape = np.shape(leaf.value)
        else:
            spec = P()
            shape = np.shape(leaf)
        return NamedSharding(mesh, _fit_spec(spec, shape, mesh, where))

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_box)


def batch_axes(mesh: jax.sharding.Mesh, rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over (the rule for "batch")."""
    rules = DEFAULT_RULES if rules is None else validate_rules(rules)
    spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return tuple(a for a in axes if a in mesh.shape)


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules | None = None) -> NamedSharding:
    """Sharding of a [B, L] token batch: B over the batch axes, L replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh, rules), None))


def global_batch(local_batch: Any, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> Any:
    """Global arrays from each process's slice of the batch (multi-host data loading).

    Every process loads `global_batch_size / jax.process_count()` rows; this assembles them
    into one global array per leaf, split over the batch axes, without any process holding the
    whole batch. Works unchanged in a single process.

    Args:
      local_batch: tree of host arrays [B_local, ...] (this process's rows).
      mesh: the device mesh.
      rules: logical axis rules (for the "batch" rule); None = DEFAULT_RULES.

    Returns:
      Tree of jax.Array [B_local * process_count, ...] sharded over the batch axes.
    """
    axes = batch_axes(mesh, rules)

    def one(x):
        x = np.asarray(x)
        sharding = NamedSharding(mesh, P(axes, *([None] * (x.ndim - 1))))
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, local_batch)


@contextlib.contextmanager
def sharding_context(mesh: jax.sharding.Mesh, rules: Rules | None = None) -> Iterator[None]:
    """Activates `mesh` and the logical rules, so `nn.with_logical_constraint` takes effect.

    Use around tracing (jit, eval_shape, init/apply) of the model:

        with sharding_context(mesh, rules):
            logits, aux = jax.jit(model.apply)(variables, tokens)
    """
    rules = DEFAULT_RULES if rules is None else validate_rules(rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def init_sharded(
    init_fn: Callable[..., Any], mesh: jax.sharding.Mesh, rules: Rules | None, *args: Any
) -> tuple[Any, Any]:
    """Initialises variables directly in their sharded layout.

    Args:
      init_fn: e.g. `functools.partial(model.init, deterministic=True)`; called as
        `init_fn(*args)` and returning a (possibly boxed) variables tree.
      mesh: the device mesh.
      rules: logical axis rules; None = DEFAULT_RULES.
      *args: arguments of `init_fn` (rng keys, example inputs).

    Returns:
      (variables, shardings): unboxed variables, each leaf a jax.Array laid out as its
      NamedSharding in `shardings` (same tree structure).
    """
    with sharding_context(mesh, rules):
        abstract = jax.eval_shape(init_fn, *args)
        shardings = logical_shardings(abstract, mesh, rules)

        def unboxed_init(*a):
            return unbox(init_fn(*a))

        variables = jax.jit(unboxed_init, out_shardings=shardings)(*args)
    return variables, shardings


def unbox(tree: Any) -> Any:
    """Removes partitioning boxes, leaving the arrays (no sharding constraint is applied)."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, tree, is_leaf=_is_box
    )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Fully replicated sharding (scalars, rng keys, step counters)."""
    return NamedSharding(mesh, P())
