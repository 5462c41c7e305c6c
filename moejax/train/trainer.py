"""The training loop: config -> sharded state -> steps -> metrics, checkpoints, plots, sample.

`train_and_evaluate(config, workdir)` is the whole run and returns a summary dict; the CLI
(`python -m moejax.train`) is a thin wrapper around it, and tests call it directly. Restarting
with the same workdir resumes from the latest committed checkpoint (state and data position),
so an interrupted run continues exactly where the uninterrupted one would be.

Shape legend: B batch, L sequence length, N MoE layers, E experts.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import sharding
from moejax.layers import ModelConfig, model_config_from_dict
from moejax.train import data as data_lib
from moejax.train.checkpoint import Checkpointer
from moejax.train.metrics import MetricsWriter, write_plots
from moejax.train.state import abstract_state, count_params, create_train_state, make_optimizer
from moejax.train.step import jit_eval_step, jit_train_step
from moejax.train.warm_start import hf_model_config, hf_start, validate_init, warm_start

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("skip", "stop")
# Required sections; `init` (moejax.train.warm_start) is optional, as in configs saved before it.
SECTIONS = ("model", "moe", "opt", "data", "mesh", "train")

# Per-device peak FLOP/s for the MFU estimate on accelerators the target table does not know
# (dense bf16 of an H100 SXM and a TPU v5e). Override with train.peak_flops.
_FALLBACK_PEAK_FLOPS = {"gpu": 989e12, "tpu": 197e12}
# The CPU peak is measured: a jitted float32 matmul of this size, the fastest of a few runs.
_CPU_MATMUL_N = 1024
_CPU_MATMUL_RUNS = 5


class NonFiniteError(RuntimeError):
    """Raised with train.nonfinite="stop" when a step's loss or gradients are not finite."""


def _require(cond: bool, field: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"config.{field}={value!r} is invalid: {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """Checks every section once, early; returns the ModelConfig.

    Raises:
      ValueError: naming the field (`config.<section>.<field>`) and the allowed values.
    """
    for section in SECTIONS:
        if section not in config:
            raise ValueError(f"config has no section {section!r}; required: {', '.join(SECTIONS)}")
    t, o = config.train, config.opt
    for name in ("steps", "batch_size", "seq_len", "microbatches", "log_every", "eval_every"):
        v = t[name]
        _require(_is_int(v) and v >= 1, f"train.{name}", v, "must be an integer >= 1")
    for name in ("eval_batches", "checkpoint_every", "keep_checkpoints"):
        v = t[name]
        _require(_is_int(v) and v >= 1, f"train.{name}", v, "must be an integer >= 1")
    _require(
        t.batch_size % t.microbatches == 0,
        "train.microbatches",
        t.microbatches,
        f"must divide train.batch_size={t.batch_size}",
    )
    _require(
        t.nonfinite in NONFINITE_POLICIES,
        "train.nonfinite",
        t.nonfinite,
        f"allowed values are {NONFINITE_POLICIES}",
    )
    _require(
        _is_int(t.sample_tokens) and t.sample_tokens >= 0,
        "train.sample_tokens",
        t.sample_tokens,
        "must be an integer >= 0",
    )
    temperature, top_p = t.get("sample_temperature", 0.0), t.get("sample_top_p", 1.0)
    _require(
        isinstance(temperature, int | float) and temperature >= 0,
        "train.sample_temperature",
        temperature,
        "must be a number >= 0 (0 = greedy)",
    )
    _require(
        isinstance(top_p, int | float) and 0 < top_p <= 1,
        "train.sample_top_p",
        top_p,
        "must be a number in (0, 1]",
    )
    _require(isinstance(o.lr, int | float) and o.lr > 0, "opt.lr", o.lr, "must be a number > 0")
    _require(
        _is_int(o.warmup_steps) and o.warmup_steps >= 0,
        "opt.warmup_steps",
        o.warmup_steps,
        "must be an integer >= 0",
    )
    _require(
        o.decay_steps is None or (_is_int(o.decay_steps) and o.decay_steps >= 1),
        "opt.decay_steps",
        o.decay_steps,
        "must be None or an integer >= 1",
    )
    for name, lo, hi in (("b1", 0, 1), ("b2", 0, 1), ("end_lr_ratio", 0, 1)):
        v = o[name]
        _require(
            isinstance(v, int | float)
            and lo <= v <= hi
            and not (name != "end_lr_ratio" and v == 1),
            f"opt.{name}",
            v,
            f"must be a number in [{lo}, {hi}{']' if name == 'end_lr_ratio' else ')'}",
        )
    for name in ("eps", "weight_decay", "grad_clip"):
        v = o[name]
        _require(isinstance(v, int | float) and v >= 0, f"opt.{name}", v, "must be a number >= 0")
    validate_init(config.get("init"))
    model_cfg = model_config_from_dict(
        config.model.to_dict(), None if config.moe is None else config.moe.to_dict()
    )
    _require(
        t.seq_len <= model_cfg.max_len,
        "train.seq_len",
        t.seq_len,
        f"must be <= model.max_len={model_cfg.max_len}",
    )
    return model_cfg


def _flops_per_token(model_cfg: ModelConfig, active_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active matmul params + causal attention (PaLM appendix B)."""
    matmul_params = active_params - model_cfg.vocab_size * model_cfg.d_model  # lookup, no matmul
    heads_dim = model_cfg.num_heads * model_cfg.resolved_head_dim
    attention = 6 * model_cfg.num_layers * seq_len * heads_dim  # QK^T and AV, fwd + bwd, causal/2
    return 6.0 * matmul_params + attention


@functools.cache
def _measured_cpu_flops() -> float:
    """Float32 FLOP/s of a jitted 1024^3 matmul on this host, measured once per process.

    The fastest of a few runs (about 0.1 s in all on an idle 2-core host): a peak is what the
    least disturbed run reaches, where a median would count other processes' load. The CPU
    "device" is the whole host: fake multi-device CPU runs split the same cores, so this rate
    is the peak of all of them together.
    """
    n = _CPU_MATMUL_N
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()  # compile
    times = []
    for _ in range(_CPU_MATMUL_RUNS):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def _peak_flops(config: ml_collections.ConfigDict) -> float:
    """Peak FLOP/s of all devices: train.peak_flops if set, a measured matmul rate on CPU,
    the target table's per-chip spec (moejax.compile.targets) on known GPUs and TPUs."""
    if config.train.peak_flops:
        return float(config.train.peak_flops) * jax.device_count()
    backend = jax.default_backend()
    if backend == "cpu":
        return _measured_cpu_flops()
    from moejax.compile.targets import target_of_device_kind

    kind = jax.devices()[0].device_kind
    target = target_of_device_kind(kind)
    if target is None:
        peak = _FALLBACK_PEAK_FLOPS.get(backend, 1e12)
        log.warning("MFU: unknown device %r, assuming %.3g FLOP/s per device", kind, peak)
        return peak * jax.device_count()
    return target.peak_flops * jax.device_count()


def _evaluate(eval_fn, state, batches) -> dict[str, float]:
    sums: dict[str, float] = {}
    for batch in batches:
        m = jax.device_get(eval_fn(state, batch))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    n = max(len(batches), 1)
    return {k: v / n for k, v in sums.items()}


def _sample(setup, state, config, tokenizer=None) -> str | None:
    """A short continuation of train.sample_prompt (bytes, or data.tokenizer's tokens), sampled
    at train.sample_temperature / sample_top_p (greedy at temperature 0), or None when
    disabled or when the data has no text encoding (token files)."""
    t = config.train
    n = t.sample_tokens
    if not n or config.data.source == "tokens":
        return None
    if tokenizer is None and setup.model_cfg.vocab_size < 256:
        return None
    from moejax.generate import generate

    if tokenizer is None:
        prompt = np.frombuffer(t.sample_prompt.encode(), dtype=np.uint8).astype(np.int32)
    else:
        prompt = np.asarray(tokenizer(t.sample_prompt)["input_ids"], np.int32)
    n = min(n, setup.model_cfg.max_len - len(prompt))
    variables = {"params": state.params}
    if state.moe_state:
        variables["moe_state"] = state.moe_state
    temperature = float(t.get("sample_temperature", 0.0))
    tokens = generate(
        setup.model_cfg,
        variables,
        prompt[None, :],
        max_new_tokens=n,
        temperature=temperature,
        top_p=float(t.get("sample_top_p", 1.0)),
        rng=jax.random.key(t.seed) if temperature > 0 else None,
    )
    out = np.asarray(jax.device_get(tokens))[0]
    if tokenizer is not None:
        return tokenizer.decode(out.tolist())
    return bytes(int(b) % 256 for b in out).decode("utf-8", errors="replace")


def _export_hf(config, setup, state, tokenizer) -> str | None:
    """Writes the final model to train.export_hf with `moejax.hf.to_hf` (and the data's
    tokenizer beside it), from process 0; None when not set."""
    path = config.train.get("export_hf")
    if not path:
        return None
    from jax.experimental import multihost_utils

    from moejax.hf import to_hf

    variables = {"params": state.params}
    if state.moe_state:
        variables["moe_state"] = state.moe_state
    variables = multihost_utils.process_allgather(variables, tiled=True)
    if jax.process_index() == 0:
        to_hf(setup.model_cfg, variables, path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    return str(path)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = False
) -> dict[str, Any]:
    """Trains per `config`, checkpointing to and resuming from `workdir`.

    Args:
      config: a ConfigDict with sections model, moe (None = dense), opt, data, mesh, train.
      workdir: run directory: checkpoints/, metrics.jsonl, TensorBoard events, plots.
      progress: show a tqdm progress bar (the CLI does).

    Returns:
      Summary: steps, start_step, first/final train loss, eval losses, skipped steps, wall
      time, tokens/s, parameter counts, sample text, paths.

    Raises:
      ValueError: an invalid config value (naming the field) or unusable data.
      NonFiniteError: train.nonfinite="stop" and a step was not finite.
    """
    t_start = time.time()
    config = hf_model_config(config)
    model_cfg = validate_config(config)
    t = config.train
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    corpus = data_lib.load_corpus(
        config.data.to_dict(), seq_len=t.seq_len, vocab_size=model_cfg.vocab_size
    )
    log.info("data: %s", corpus.description)
    mesh_cfg = config.mesh
    mesh = sharding.make_mesh(
        data=mesh_cfg.data, fsdp=mesh_cfg.fsdp, expert=mesh_cfg.expert, tensor=mesh_cfg.tensor
    )
    rules = None if mesh_cfg.rules is None else sharding.validate_rules(mesh_cfg.rules)
    tx = make_optimizer(config.opt, t.steps)
    state, setup = create_train_state(model_cfg, tx, mesh, rules, seq_len=t.seq_len, seed=t.seed)
    total_params, active_params = count_params(state.params, model_cfg)

    # Each process loads its rows of every global batch; which rows follows the batch sharding,
    # so the global batch (and the checkpointed data position) does not depend on the process
    # count.
    batch_sharding = sharding.batch_sharding(mesh, rules)
    train_it = data_lib.train_iterator(
        corpus,
        seq_len=t.seq_len,
        batch_size=t.batch_size,
        seed=config.data.seed,
        sharding=batch_sharding,
    )
    eval_set = [
        data_lib.global_batch(b, batch_sharding)
        for b in data_lib.eval_batches(
            corpus,
            seq_len=t.seq_len,
            batch_size=t.batch_size,
            max_batches=t.eval_batches,
            sharding=batch_sharding,
        )
    ]
    ckpt = Checkpointer(workdir / "checkpoints", every=t.checkpoint_every, keep=t.keep_checkpoints)
    config_json = config.to_json_best_effort()
    restored = ckpt.restore(abstract_state(setup.state_shardings, state))
    if restored is not None:
        state, data_state, _ = restored
        train_it.set_state(data_state)
    elif config.get("init") is not None and config.init.get("hf_checkpoint"):
        # A new run from an imported HF model; resumes from its own checkpoints after.
        state = hf_start(config, state, setup)
    elif config.get("init") is not None and config.init.from_checkpoint:
        # A new run from another run's parameters (as they are, or upcycled); once this run
        # has a checkpoint of its own it resumes from that instead.
        calibration = [
            # model inputs, as the trainer feeds them
            np.asarray(jax.device_get(data_lib.batch_tokens(b)))[:, :-1]
            for b in eval_set[: config.init.calibration_batches]
        ]
        state = warm_start(config, state, setup, calibration=calibration or None)
    start_step = int(jax.device_get(state.step))

    step_fn = jit_train_step(setup, t.microbatches)
    eval_fn = jit_eval_step(setup)
    schedule_lr = _lr_fn(config, t.steps)
    tokens_per_step = t.batch_size * t.seq_len
    flops_per_step = _flops_per_token(model_cfg, active_params, t.seq_len) * tokens_per_step
    peak = _peak_flops(config)

    writer = MetricsWriter(workdir, start_step=start_step)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start_step, unit="step", dynamic_ncols=True)
    first_loss = final_loss = None
    eval_losses: list[tuple[int, float]] = []
    window_t, window_steps = time.time(), 0
    tokens_per_s = mfu = 0.0
    try:
        with sharding.sharding_context(mesh, rules):
            for step in range(start_step + 1, t.steps + 1):
                batch = data_lib.global_batch(next(train_it), batch_sharding)
                state, metrics = step_fn(state, batch)
                window_steps += 1
                is_last = step == t.steps
                if step % t.log_every == 0 or is_last or step == start_step + 1:
                    m = jax.device_get(metrics)
                    elapsed = time.time() - window_t
                    tokens_per_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                    mfu = tokens_per_s / tokens_per_step * flops_per_step / peak
                    window_t, window_steps = time.time(), 0
                    record = {k: v for k, v in m.items() if k != "expert_load"}
                    record.update(lr=schedule_lr(step - 1), tokens_per_s=tokens_per_s, mfu=mfu)
                    record["skipped_total"] = int(jax.device_get(state.skipped))
                    writer.write("train", step, record, expert_load=m.get("expert_load"))
                    if m["skipped"] and t.nonfinite == "stop":
                        raise NonFiniteError(
                            f"step {step}: non-finite loss {float(m['loss'])} or gradient norm "
                            f"{float(m['grad_norm'])} (train.nonfinite='stop'); "
                            "this step is not checkpointed"
                        )
                    final_loss = float(m["loss"])
                    if first_loss is None:
                        first_loss = final_loss
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{final_loss:.3f}",
                            tok_s=f"{tokens_per_s:,.0f}",
                            mfu=f"{mfu:.1%}",
                        )
                elif t.nonfinite == "stop":
                    if bool(jax.device_get(metrics["skipped"])):
                        raise NonFiniteError(
                            f"step {step}: non-finite loss or gradients "
                            "(train.nonfinite='stop'); this step is not checkpointed"
                        )
                if step % t.eval_every == 0 or is_last:
                    ev = _evaluate(eval_fn, state, eval_set)
                    writer.write("eval", step, ev)
                    eval_losses.append((step, ev["ce_loss"]))
                    window_t = time.time()  # evaluation time is not training throughput
                ckpt.save(step, state, train_it.get_state(), config_json, force=is_last)
                if bar is not None:
                    bar.update(1)
            if start_step >= t.steps and not eval_losses:
                ev = _evaluate(eval_fn, state, eval_set)
                eval_losses.append((start_step, ev["ce_loss"]))
            ckpt.wait()
            tokenizer = None
            if config.data.get("tokenizer"):
                tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
            sample = _sample(setup, state, config, tokenizer)
            exported = _export_hf(config, setup, state, tokenizer)
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
        writer.close()

    plots = write_plots(workdir)
    wall = time.time() - t_start
    return {
        "workdir": str(workdir),
        "data": corpus.description,
        "start_step": start_step,
        "steps": t.steps,
        "first_train_loss": first_loss,
        "final_train_loss": final_loss,
        "eval_losses": eval_losses,
        "final_eval_loss": eval_losses[-1][1] if eval_losses else None,
        "skipped_steps": int(jax.device_get(state.skipped)),
        "params_total": total_params,
        "params_active": active_params,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "wall_s": wall,
        "sample": sample,
        "plots": [str(p) for p in plots],
        "checkpoints": ckpt.directory.as_posix(),
        "export_hf": exported,
        "final_state": state,
    }


def _lr_fn(config: ml_collections.ConfigDict, total_steps: int):
    from moejax.train.state import learning_rate_schedule

    schedule = learning_rate_schedule(config.opt, total_steps)
    return lambda count: float(schedule(count))


def format_summary(summary: Mapping[str, Any]) -> str:
    """The one-screen end-of-run summary the CLI prints."""
    lines = [
        f"workdir      {summary['workdir']}",
        f"data         {summary['data']}",
        f"params       {summary['params_total']:,} total, {summary['params_active']:,} active",
        f"steps        {summary['start_step']} -> {summary['steps']}"
        f" ({summary['skipped_steps']} skipped non-finite)",
    ]
    if summary["final_train_loss"] is not None:
        lines.append(
            f"train loss   {summary['first_train_loss']:.4f} -> {summary['final_train_loss']:.4f}"
        )
    if summary["eval_losses"]:
        evals = ", ".join(f"{s}: {v:.4f}" for s, v in summary["eval_losses"][-4:])
        lines.append(f"val loss     {evals}  (nats/token)")
        lines.append(
            f"val bits     {summary['final_eval_loss'] / math.log(2):.4f} bits/token at the end"
        )
    lines.append(
        f"throughput   {summary['tokens_per_s']:,.0f} tokens/s, est. MFU {summary['mfu']:.2%}"
    )
    lines.append(f"wall time    {summary['wall_s']:.1f} s")
    lines.append(f"checkpoints  {summary['checkpoints']}")
    if summary.get("export_hf"):
        lines.append(f"HF export    {summary['export_hf']}")
    for p in summary["plots"]:
        lines.append(f"plot         {p}")
    if summary["sample"] is not None:
        lines.append("sample       " + json.dumps(summary["sample"])[:600])
    return "\n".join(lines)
