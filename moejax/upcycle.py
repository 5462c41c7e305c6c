"""Sparse upcycling: turn a dense moejax `Transformer` into an MoE one, layer by layer.

Legend: B batch, L length, T calibration tokens, D model width, F dense FFN hidden width,
E routed experts, f expert hidden width, G groups of hidden units (segments of width f).

Layer i of the upcycled model is an MoE layer iff `model_cfg.is_moe_layer(i)`; its MoE block is
built from layer i's dense FFN (`mlp/wi_gate [D, F]`, `mlp/wi_up [D, F]`, `mlp/wo [F, D]`).
Everything else (embeddings, attention, norms, the other layers' FFNs, the head) is copied
exactly. Three methods:

  copy       every expert = the dense FFN (sparse upcycling, Komatsuzaki et al. 2022). With
             noise=0, a token-choice router and norm_topk_prob=True the combine weights sum to 1
             over identical experts, so the model computes the dense function for any router.
  partition  the F hidden units are split into E groups of f = F / E units, expert e = the
             dense FFN restricted to group e (MoEfication, Read-ME). An elementwise activation
             makes sum_e expert_e(x) = dense(x) exactly; with top_k < E the model is sparse.
             Groups come from `balanced_kmeans` on calibration activations when given, else a
             random permutation.
  shared     the dense FFN becomes the (fused) shared expert, width F; the routed experts start
             as copies of it (f = F) or as its segments of f units, expert e = segment e mod F/f
             (fine-grained experts, DeepSeekMoE / MoTE), grouped like "partition".

The router (`router/kernel`, `router/null_kernel`), `shared_gate` and collection `moe_state`
(expert bias) are initialised exactly as `Transformer(model_cfg).init(k, ...)` initialises them,
k = jax.random.split(key, 3)[0] (the other two keys draw the grouping and the noise).
`noise` > 0 adds Gaussian noise of standard deviation noise * std(w) to each routed expert
weight (w the dense matrix it came from); the shared expert is never perturbed.

Function preservation holds for dropless token-choice routing; capacity dispatch may drop
tokens and expert choice may leave a token with no expert. For "partition", norm_topk_prob with
routed_scaling_factor = top_k gives the chosen experts unit weight on average, so a token's
output is about the part of the dense FFN those experts hold.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moejax.activations import GATED, mlp_hidden
from moejax.layers.config import ModelConfig, MoEConfig
from moejax.layers.transformer import Transformer, scan_to_unrolled, unrolled_to_scan

METHODS = ("copy", "partition", "shared")
# Params of an MoE block that have no dense counterpart: initialised as the model does.
_FRESH_MODULES = ("router", "shared_gate")


def upcycle(
    dense_cfg: ModelConfig,
    dense_variables: Mapping[str, Any],
    moe_cfg: MoEConfig,
    *,
    method: str,
    key: jax.Array,
    noise: float = 0.0,
    calibration: jax.Array | Sequence[jax.Array] | None = None,
    first_dense_layers: int | None = None,
    moe_every: int | None = None,
    scan_layers: bool | None = None,
) -> tuple[ModelConfig, dict]:
    """Builds an MoE model's config and variables from a dense model's.

    Args:
      dense_cfg: config of the dense source (`moe=None`).
      dense_variables: its variables (`{"params": ...}`, boxed or plain, scan or unrolled layout
        as dense_cfg.scan_layers says); other collections are ignored.
      moe_cfg: the MoE block of the target. Its activation must be dense_cfg.dense_activation;
        "copy" needs d_ff = F, "partition" d_ff = F / num_experts, "shared" a shared expert of
        width F (shared_hidden) and d_ff dividing F; "copy" and "partition" take no shared experts.
      method: "copy", "partition" or "shared" (see the module docstring).
      key: PRNG key for the router (and other fresh) parameters, the random grouping and noise.
      noise: relative scale of the Gaussian noise on the routed experts' weights (>= 0).
      calibration: token batches, one int array [B, L] or a sequence of them, used by
        "partition" and the sliced "shared" to group hidden units by co-activation.
      first_dense_layers, moe_every, scan_layers: the target's layer pattern and layout; None
        keeps dense_cfg's value.

    Returns:
      (model_cfg, variables): dense_cfg with `moe=moe_cfg` and the layout fields above, and
      plain-array variables with exactly the structure, shapes and dtypes of
      `nn.meta.unbox(Transformer(model_cfg).init(...))`.

    Raises:
      ValueError naming the field or variable that cannot be mapped.
    """
    if method not in METHODS:
        raise ValueError(
            f"method={method!r} is invalid: allowed values are {', '.join(map(repr, METHODS))}"
        )
    if not (isinstance(noise, int | float) and noise >= 0):
        raise ValueError(f"noise={noise!r} is invalid: must be a number >= 0")
    if dense_cfg.moe is not None:
        raise ValueError("ModelConfig.moe of dense_cfg must be None: the source must be dense")
    layout = dict(first_dense_layers=first_dense_layers, moe_every=moe_every)
    layout = {k: v for k, v in dict(layout, scan_layers=scan_layers).items() if v is not None}
    model_cfg = dataclasses.replace(dense_cfg, moe=moe_cfg, **layout)
    _check_configs(dense_cfg, model_cfg, method, calibration)
    dense_params = _dense_params(dense_cfg, dense_variables)

    init_key, order_key, noise_key = jax.random.split(key, 3)
    fresh, expected = _fresh_init(model_cfg, init_key)
    features = None
    if calibration is not None:
        features = _calibration_features(dense_cfg, dense_params, model_cfg, calibration)

    params = {k: v for k, v in dense_params.items() if not k.startswith("layers_")}
    for i in range(model_cfg.num_layers):
        layer = dict(dense_params[f"layers_{i}"])
        if model_cfg.is_moe_layer(i):
            mlp = layer.pop("mlp")
            num_segments = dense_cfg.d_ff // moe_cfg.d_ff  # G
            if method == "copy":
                order_F = jnp.arange(dense_cfg.d_ff)
            elif features is not None:
                order_F = balanced_kmeans(
                    features[i], num_segments, jax.random.fold_in(order_key, i)
                ).reshape(-1)
            else:
                order_F = jax.random.permutation(jax.random.fold_in(order_key, i), dense_cfg.d_ff)
            layer["moe"] = _moe_block(
                mlp, moe_cfg, order_F, method, noise, jax.random.fold_in(noise_key, i)
            )
        params[f"layers_{i}"] = layer

    variables = {"params": params}
    for path, value in fresh.items():
        _insert(variables, path, value)
    flat = traverse_util.flatten_dict(variables)
    if set(flat) != set(expected):
        raise AssertionError(
            f"upcycle built {sorted(set(flat) ^ set(expected))} unlike the model's init"
        )
    for path, want in expected.items():
        if flat[path].shape != want.shape:
            raise AssertionError(f"upcycle built {path} of shape {flat[path].shape}, not {want}")
        flat[path] = jnp.asarray(flat[path], want.dtype)
    variables = traverse_util.unflatten_dict(flat)
    if model_cfg.scan_layers:
        variables = {c: unrolled_to_scan(model_cfg, tree) for c, tree in variables.items()}
    return model_cfg, variables


def balanced_kmeans(
    features_FxT: jax.Array | np.ndarray, num_groups: int, key: jax.Array, *, iters: int = 30
) -> np.ndarray:
    """Groups F hidden units into num_groups equal groups by their activation patterns.

    Spherical balanced k-means: each unit's feature row (its |activation| over T calibration
    tokens) is scaled to unit norm, so two units are close when they fire on the same tokens,
    whatever their magnitudes (MoEfication's co-activation criterion). Centroids start at
    farthest-point picks from a random first unit; each iteration assigns units, most confident
    first (highest best similarity), to their most similar centroid that still has room, so
    every group has exactly F / num_groups units; it stops when the assignment repeats.

    Args:
      features_FxT: non-negative activation magnitudes, one row per hidden unit.
      num_groups: G, must divide F.
      key: PRNG key of the first centroid.
      iters: at most this many assignment rounds.

    Returns:
      int32 [G, F / G]: the unit indices of each group, ascending within a group.
    """
    x_FxT = np.asarray(features_FxT, np.float64)
    num_units = x_FxT.shape[0]
    if x_FxT.ndim != 2 or num_groups < 1 or num_units % num_groups:
        raise ValueError(
            f"balanced_kmeans: features of shape {x_FxT.shape} cannot form {num_groups} equal "
            "groups (need [F, T] with F divisible by num_groups)"
        )
    size = num_units // num_groups
    x_FxT = x_FxT / np.maximum(np.linalg.norm(x_FxT, axis=1, keepdims=True), 1e-12)
    picks = [int(jax.random.randint(key, (), 0, num_units))]
    for _ in range(1, num_groups):
        nearest_F = np.max(x_FxT @ x_FxT[picks].T, axis=1)
        nearest_F[picks] = np.inf
        picks.append(int(np.argmin(nearest_F)))
    centroids_GxT = x_FxT[picks]
    assign_F = np.full(num_units, -1)
    for _ in range(iters):
        sims_FxG = x_FxT @ centroids_GxT.T
        new_F = np.empty(num_units, np.int64)
        room_G = np.full(num_groups, size)
        for unit in np.argsort(-sims_FxG.max(axis=1), kind="stable"):
            sims_G = np.where(room_G > 0, sims_FxG[unit], -np.inf)
            group = int(np.argmax(sims_G))
            new_F[unit] = group
            room_G[group] -= 1
        if np.array_equal(new_F, assign_F):
            break
        assign_F = new_F
        for g in range(num_groups):
            mean_T = x_FxT[assign_F == g].mean(axis=0)
            centroids_GxT[g] = mean_T / max(np.linalg.norm(mean_T), 1e-12)
    return np.stack([np.flatnonzero(assign_F == g) for g in range(num_groups)]).astype(np.int32)


def _check_configs(dense_cfg, model_cfg, method, calibration) -> None:
    moe, f_dense = model_cfg.moe, dense_cfg.d_ff
    if model_cfg.num_moe_layers == 0:
        raise ValueError(
            f"ModelConfig.first_dense_layers={model_cfg.first_dense_layers} / moe_every="
            f"{model_cfg.moe_every} leave no MoE layer in {model_cfg.num_layers} layers"
        )
    if moe.activation != dense_cfg.dense_activation:
        raise ValueError(
            f"MoEConfig.activation={moe.activation!r} must equal the dense FFN's "
            f"ModelConfig.dense_activation={dense_cfg.dense_activation!r}"
        )
    if method in ("copy", "partition") and moe.num_shared_experts:
        raise ValueError(
            f"MoEConfig.num_shared_experts={moe.num_shared_experts} must be 0 for "
            f"method={method!r} (method='shared' makes the dense FFN the shared expert)"
        )
    if method == "copy" and moe.d_ff != f_dense:
        raise ValueError(
            f"MoEConfig.d_ff={moe.d_ff} must equal ModelConfig.d_ff={f_dense} for method='copy'"
        )
    if method == "partition":
        if f_dense % moe.num_experts:
            raise ValueError(
                f"MoEConfig.num_experts={moe.num_experts} must divide ModelConfig.d_ff={f_dense} "
                "for method='partition'"
            )
        if moe.d_ff * moe.num_experts != f_dense:
            raise ValueError(
                f"MoEConfig.d_ff={moe.d_ff} must equal ModelConfig.d_ff / num_experts = "
                f"{f_dense // moe.num_experts} for method='partition'"
            )
    if method == "shared":
        if moe.num_shared_experts < 1:
            raise ValueError("MoEConfig.num_shared_experts=0 must be >= 1 for method='shared'")
        if moe.shared_hidden != f_dense:
            raise ValueError(
                f"MoEConfig.shared_d_ff (shared_hidden={moe.shared_hidden}) must equal "
                f"ModelConfig.d_ff={f_dense} for method='shared'"
            )
        if f_dense % moe.d_ff:
            raise ValueError(
                f"MoEConfig.d_ff={moe.d_ff} must divide ModelConfig.d_ff={f_dense} for "
                "method='shared'"
            )
    if calibration is not None and (method == "copy" or moe.d_ff == f_dense):
        raise ValueError(
            f"calibration is unused by method={method!r} with MoEConfig.d_ff={moe.d_ff}: it "
            "groups hidden units for 'partition' and 'shared' with d_ff < ModelConfig.d_ff"
        )


def _dense_params(dense_cfg: ModelConfig, dense_variables: Mapping[str, Any]) -> dict:
    """dense_variables["params"], plain arrays in the unrolled layout, checked against the
    structure and shapes `Transformer(dense_cfg).init` gives."""
    if "params" not in dense_variables:
        raise ValueError("dense_variables has no 'params' collection")
    params = flax.core.unfreeze(nn.meta.unbox(dense_variables["params"]))
    if dense_cfg.scan_layers:
        stacked = params.get("dense_layers", {})
        leaves = jax.tree.leaves(stacked)
        num_layers = leaves[0].shape[0] if leaves else 0
    else:
        num_layers = sum(k.startswith("layers_") for k in params)
    if num_layers != dense_cfg.num_layers:
        raise ValueError(
            f"ModelConfig.num_layers={dense_cfg.num_layers} of dense_cfg, but dense_variables "
            f"hold {num_layers} layers"
        )
    expected = jax.eval_shape(
        lambda k: nn.meta.unbox(Transformer(dense_cfg).init(k, jnp.zeros((1, 1), jnp.int32))),
        jax.random.key(0),
    )["params"]
    got, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(expected)
    for path in sorted(set(got) | set(want)):
        name = "params/" + "/".join(path)
        if path not in got or path not in want:
            where = "missing from" if path not in got else "unexpected in"
            raise ValueError(f"dense_variables {name} is {where} a model of dense_cfg")
        if tuple(got[path].shape) != tuple(want[path].shape):
            raise ValueError(
                f"dense_variables {name} has shape {tuple(got[path].shape)}, dense_cfg implies "
                f"{tuple(want[path].shape)} (check d_model, d_ff, heads, vocab_size)"
            )
    return scan_to_unrolled(dense_cfg, params) if dense_cfg.scan_layers else params


def _init_leaves(model_cfg: ModelConfig, key: jax.Array, *, fresh_only: bool) -> dict:
    """{(collection, *path): array} of the model's init, unrolled layout; with fresh_only, only
    the leaves with no dense counterpart (router, shared_gate, moe_state)."""
    variables = nn.meta.unbox(Transformer(model_cfg).init(key, jnp.zeros((1, 1), jnp.int32)))
    flat = {}
    for collection, tree in variables.items():
        if model_cfg.scan_layers:
            tree = scan_to_unrolled(model_cfg, tree)
        for path, leaf in traverse_util.flatten_dict(tree).items():
            path = (collection, *path)
            fresh = collection != "params" or (
                "moe" in path and path[path.index("moe") + 1] in _FRESH_MODULES
            )
            if fresh or not fresh_only:
                flat[path] = leaf
    return flat


# jit drops the init of every leaf that is not returned (the copied weights); compiled once
# per model config.
_fresh_leaves = jax.jit(functools.partial(_init_leaves, fresh_only=True), static_argnums=0)


def _fresh_init(model_cfg: ModelConfig, key: jax.Array) -> tuple[dict, dict]:
    """(the fresh leaves as the model's init makes them, ShapeDtypeStruct of every leaf)."""
    cfg = dataclasses.replace(model_cfg, remat="none")
    expected = jax.eval_shape(functools.partial(_init_leaves, cfg, fresh_only=False), key)
    return _fresh_leaves(cfg, key), expected


def _insert(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _moe_block(mlp, moe: MoEConfig, order_F, method, noise, key) -> dict:
    """The MoE block's expert params from one dense FFN: expert e takes the hidden units
    order_F[(e mod G) * f : (e mod G + 1) * f], G = F / f (copy: G = 1, order = identity)."""
    f = moe.d_ff
    segments_GxF = jnp.asarray(order_F).reshape(-1, f)
    idx_Exf = jnp.sort(segments_GxF[jnp.arange(moe.num_experts) % segments_GxF.shape[0]], axis=1)
    names = ("wi_gate", "wi_up", "wo") if moe.activation in GATED else ("wi_up", "wo")
    experts = {}
    for j, name in enumerate(names):
        w = mlp[name]
        # [D, F] -> [E, D, f]; wo [F, D] -> [E, f, D]
        w_e = w[idx_Exf] if name == "wo" else jnp.moveaxis(w[:, idx_Exf], 1, 0)
        if noise:
            scale = noise * jnp.std(w.astype(jnp.float32))
            eps = jax.random.normal(jax.random.fold_in(key, j), w_e.shape, jnp.float32)
            w_e = (w_e.astype(jnp.float32) + scale * eps).astype(w.dtype)
        experts[name] = w_e
    block = {"experts": experts}
    if method == "shared":
        block["shared"] = dict(mlp)
    return block


def _calibration_features(dense_cfg, dense_params, model_cfg, calibration) -> dict[int, Any]:
    """{layer i: |hidden activations| [F, T]} of the dense model's FFN at each MoE layer of
    model_cfg, over the calibration tokens."""
    batches = [calibration] if hasattr(calibration, "ndim") else list(calibration)
    if not batches:
        raise ValueError("calibration is empty: pass token batches [B, L] or None")
    cfg = dataclasses.replace(dense_cfg, scan_layers=False, remat="none")
    model = Transformer(cfg)
    layers = [i for i in range(cfg.num_layers) if model_cfg.is_moe_layer(i)]

    @jax.jit
    def hidden(params, tokens_BxL):
        _, state = model.apply(
            {"params": params},
            tokens_BxL,
            capture_intermediates=lambda mdl, _: mdl.name == "ffn_norm",
            mutable=["intermediates"],
        )
        out = {}
        for i in layers:
            (h_BxLxD,) = state["intermediates"][f"layers_{i}"]["ffn_norm"]["__call__"]
            mlp = {k: w.astype(jnp.float32) for k, w in params[f"layers_{i}"]["mlp"].items()}
            h_TxF = mlp_hidden(
                h_BxLxD.reshape(-1, cfg.d_model).astype(jnp.float32),
                mlp.get("wi_gate"),
                mlp["wi_up"],
                cfg.dense_activation,
            )
            out[i] = jnp.abs(h_TxF).T
        return out

    per_batch = []
    for tokens in batches:
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"calibration batches must be 2-D integer token arrays [B, L], got shape "
                f"{tokens.shape} dtype {tokens.dtype}"
            )
        per_batch.append(hidden(dense_params, tokens))
    return {i: np.concatenate([np.asarray(b[i]) for b in per_batch], axis=1) for i in layers}
