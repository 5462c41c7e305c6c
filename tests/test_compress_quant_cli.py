"""`python -m moejax.compress --bits`: a trained run -> a quantized run that evaluates, trains
with its integer expert values and scales frozen, resumes exactly and exports to HF.

The losses the CLI reports are checked against quantize_experts (and prune_experts) applied by
hand and evaluated with a plain Transformer.apply; the frozen-parameter optimizer against AdamW
run on the trainable parameters alone."""

import functools
import importlib.util
import json
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

pytest.importorskip("qwix")

from moejax.compress.__main__ import compress_run, format_summary, main  # noqa: E402
from moejax.compress.prune import prune_experts  # noqa: E402
from moejax.compress.quantize import dequantize_experts, quantize_experts  # noqa: E402
from moejax.compress.stats import routing_stats  # noqa: E402
from moejax.layers import Transformer  # noqa: E402
from moejax.sharding import make_mesh  # noqa: E402
from moejax.train import data as data_lib  # noqa: E402
from moejax.train.state import frozen_params, make_optimizer, with_frozen_params  # noqa: E402
from moejax.train.step import cross_entropy  # noqa: E402
from moejax.train.trainer import train_and_evaluate  # noqa: E402
from moejax.train.warm_start import load_run  # noqa: E402
from tests.test_compress_cli import _config  # noqa: E402

EXPERTS = ("wi_gate", "wi_up", "wo")


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A 3-step run of test_compress_cli's model, the source every test here compresses."""
    workdir = tmp_path_factory.mktemp("src")
    train_and_evaluate(_config(3), workdir)
    return workdir


@pytest.fixture(scope="module")
def int8_run(source_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("q8") / "run"
    return out, compress_run(source_run, out, bits=8, calib_batches=2)


def _source(workdir):
    """(config, model_cfg, variables as numpy) of a run's latest checkpoint."""
    config, state, setup, _ = load_run(workdir, make_mesh(data=-1))
    variables = {"params": state.params, "moe_state": state.moe_state}
    return config, setup.model_cfg, jax.tree.map(np.asarray, jax.device_get(variables))


def _batches(config, n):
    """The run's first n validation batches [B, L + 1] (what the CLI evaluates/calibrates on)."""
    t = config.train
    corpus = data_lib.load_corpus(config.data.to_dict(), seq_len=t.seq_len, vocab_size=256)
    batches = data_lib.eval_batches(
        corpus, seq_len=t.seq_len, batch_size=t.batch_size, max_batches=n
    )
    return [np.asarray(data_lib.batch_tokens(b)) for _, b in zip(range(n), batches, strict=False)]


def _val_loss(model_cfg, variables, batches):
    """Mean cross-entropy of a model over batches, by a plain Transformer.apply."""
    variables = {k: variables[k] for k in ("params", "moe_state") if k in variables}
    apply = jax.jit(lambda v, x: Transformer(model_cfg).apply(v, x, deterministic=True)[0])
    losses = [float(cross_entropy(apply(variables, b[:, :-1]), b[:, 1:])) for b in batches]
    return float(np.mean(losses))


def _moe_experts(params):
    return params["moe_layers"]["moe"]["experts"]


def test_int8_alone_reports_the_loss_of_quantize_experts_by_hand(source_run, int8_run):
    out, s = int8_run
    config, model_cfg, variables = _source(source_run)
    qcfg, qvars = quantize_experts(model_cfg, variables, 8)
    batches = _batches(config, config.train.eval_batches)
    before, after = _val_loss(model_cfg, variables, batches), _val_loss(qcfg, qvars, batches)
    assert [st["stage"] for st in s["stages"]] == ["before", "int8, per channel"]
    np.testing.assert_allclose(s["val_loss"], (before, after), rtol=1e-5)
    assert abs(after - before) < 0.01  # int8 barely moves a trained model
    table = format_summary(s)
    assert f"| validation loss (nats/token) | {before:.4f} | {after:.4f} |" in table
    # Bytes: float32 experts before; after, one byte per value plus float32 per-channel scales.
    e, d, f, n = 8, 32, 32, 2  # experts, d_model, moe.d_ff, MoE layers
    assert s["expert_bytes"] == (n * 3 * e * d * f * 4, n * (3 * e * d * f + 3 * e * 32 * 4))
    assert s["experts"] == (8, 8)
    # The written run holds exactly the by-hand values and scales, and says it is quantized.
    config2, state, setup, step = load_run(out, make_mesh(data=-1))
    assert step == 0 and config2.moe.expert_bits == 8 and setup.model_cfg == qcfg
    got, want = _moe_experts(jax.device_get(state.params)), _moe_experts(qvars["params"])
    assert set(got) == {*EXPERTS, *(f"{w}_scale" for w in EXPERTS)}
    for name in got:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])
    assert json.loads((out / "config.json").read_text())["moe"]["expert_bits"] == 8
    assert json.loads((out / "compress.json").read_text())["val_loss"][1] == s["val_loss"][1]


def _train_config(out, steps, **train):
    config = ml_collections.ConfigDict(json.loads((out / "config.json").read_text()))
    config.train.update(steps=steps, log_every=1, eval_every=4, checkpoint_every=2, **train)
    config.opt.decay_steps = 4  # the same schedule whether the run is split or not
    config.opt.warmup_steps = 1
    return config


def test_int8_run_trains_frozen_resumes_and_exports(int8_run, tmp_path):
    out, _ = int8_run
    start = jax.device_get(load_run(out, make_mesh(data=-1))[1].params)
    shutil.copytree(out, tmp_path / "full")
    shutil.copytree(out, tmp_path / "split")
    hf_dir = tmp_path / "hf"
    full = train_and_evaluate(_train_config(out, 4, export_hf=str(hf_dir)), tmp_path / "full")
    assert full["start_step"] == 0 and full["skipped_steps"] == 0
    assert np.isfinite([full["first_train_loss"], full["final_train_loss"]]).all()
    state = jax.device_get(full["final_state"])

    # Frozen: the int8 values and their scales are bitwise what the checkpoint started with;
    # everything else moved, and the optimizer keeps moments for the trainable leaves only.
    frozen = frozen_params(state.params)
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    for (path, new), old, is_frozen in zip(
        leaves, jax.tree.leaves(start), jax.tree.leaves(frozen), strict=True
    ):
        name = jax.tree_util.keystr(path)
        assert is_frozen == ("experts" in name), name
        if is_frozen:
            np.testing.assert_array_equal(new, old, err_msg=name)
        else:
            assert not np.array_equal(new, old), name
    trainable = sum(
        x.size
        for x, f in zip(jax.tree.leaves(state.params), jax.tree.leaves(frozen), strict=True)
        if not f
    )
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert moments == 2 * trainable  # AdamW's mu and nu, nothing for the frozen leaves

    # Resume: 2 steps, stop, 2 more = 4 uninterrupted, bitwise (state and losses).
    first = train_and_evaluate(_train_config(out, 2), tmp_path / "split")
    split = train_and_evaluate(_train_config(out, 4), tmp_path / "split")
    assert first["start_step"] == 0 and split["start_step"] == 2
    jax.tree.map(np.testing.assert_array_equal, state, jax.device_get(split["final_state"]))
    assert split["final_eval_loss"] == full["final_eval_loss"]

    # Export: transformers loads the dequantized model and gives the quantized model's logits.
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    assert full["export_hf"] == str(hf_dir)
    model_cfg = load_run(out, make_mesh(data=-1))[2].model_cfg
    variables = {"params": state.params, "moe_state": state.moe_state}
    tokens = np.random.default_rng(0).integers(0, 256, (2, 16))
    want = Transformer(model_cfg).apply(variables, jnp.asarray(tokens), deterministic=True)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    with torch.no_grad():
        got = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(want), atol=2e-4)
    from moejax.hf import from_hf

    _, imported = from_hf(hf_dir)
    _, dequantized = dequantize_experts(model_cfg, variables)
    for name in EXPERTS:
        np.testing.assert_array_equal(
            _moe_experts(imported["params"])[name], _moe_experts(dequantized["params"])[name]
        )


def _config_py(path):
    """get_config() of a config file, as `python -m moejax.train --config=path` loads it."""
    spec = importlib.util.spec_from_file_location("written_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_cli_prune_then_mixed_int4_then_train(source_run, tmp_path, capsys):
    out = tmp_path / "p4q4"
    flags = ["--experts=4", "--method=prune", "--bits=4", "--group_size=16", "--policy=mixed"]
    code = main([f"--workdir={source_run}", f"--out={out}", *flags, "--calib_batches=2"])
    stdout = capsys.readouterr().out
    assert code == 0
    s = json.loads((out / "compress.json").read_text())
    names = [st["stage"] for st in s["stages"]]
    assert names == ["before", "prune (frequency)", "int4, 25% most used at int8, groups of 16"]
    assert "| | before | after prune (frequency) | after int4, 25% most used" in stdout

    # By hand: statistics, prune, statistics of the pruned model, mixed int4, evaluate.
    config, model_cfg, variables = _source(source_run)
    calib = [b[:, :-1] for b in _batches(config, 2)]
    pcfg, pvars = prune_experts(model_cfg, variables, routing_stats(model_cfg, variables, calib), 4)
    pstats = routing_stats(pcfg, pvars, calib)
    qcfg, qvars = quantize_experts(pcfg, pvars, 4, 16, "mixed", stats=pstats)
    batches = _batches(config, config.train.eval_batches)
    want = [
        _val_loss(c, v, batches) for c, v in ((model_cfg, variables), (pcfg, pvars), (qcfg, qvars))
    ]
    np.testing.assert_allclose([st["val_loss"] for st in s["stages"]], want, rtol=1e-5)
    assert f"| validation loss (nats/token) | {want[0]:.4f} | {want[1]:.4f} | {want[2]:.4f} |" in (
        stdout
    )
    # Bytes after: per layer and weight, the most used expert (keep 0.25 of 4) at one byte per
    # value, the other three at half a byte, plus float32 scales [4, 32 / 16, 32].
    n, d, f = 2, 32, 32
    assert s["stages"][2]["expert_bytes"] == n * 3 * (d * f * 5 // 2 + 4 * 2 * 32 * 4)
    for counts, layer_bits in zip(
        (st.counts_E for st in pstats),
        np.asarray(qvars["quant_bits"]["moe_layers"]["moe"]["experts"]["expert_bits"]),
        strict=True,
    ):
        assert layer_bits[np.argmax(counts)] == 8 and (layer_bits == 4).sum() == 3

    # The written run trains on from its config.py (what `python -m moejax.train
    # --config=<out>/config.py --workdir=<out>` runs); the quantized experts stay as written.
    config = _config_py(out / "config.py")
    # None fields are typed again (JSON drops the type), so command-line overrides such as
    # --config.train.export_hf=DIR apply to them.
    assert config.train.export_hf is None and config.train.get_type("export_hf") is str
    assert config.opt.get_type("decay_steps") is int
    config.train.update(steps=2, log_every=1, eval_every=2)
    summary = train_and_evaluate(config, out)
    assert summary["start_step"] == 0 and np.isfinite(summary["final_eval_loss"])
    mesh = make_mesh(data=-1)
    before = _moe_experts(jax.device_get(load_run(out, mesh, 0)[1].params))
    cfg2, after_state, _, step = load_run(out, mesh)
    assert step == 2 and cfg2.moe.expert_bits == 4 and cfg2.moe.expert_group_size == 16
    after = _moe_experts(jax.device_get(after_state.params))
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    for name in EXPERTS:
        np.testing.assert_array_equal(after[name], _moe_experts(qvars["params"])[name])


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--bits=3"], "--bits: invalid choice: 3 (choose from 8, 4)"),
        (["--bits=8", "--policy=x"], "--policy: invalid choice"),
        ([], "--experts or --bits is required"),
        (["--experts=4"], "--experts=4 needs --method: allowed values are ('merge', 'prune')"),
        (["--method=prune", "--bits=8"], "--method='prune' needs --experts=N"),
        (["--group_size=16"], "--group_size=16 needs --bits"),
        (["--policy=mixed"], "--policy='mixed' needs --bits"),
        (["--bits=8", "--policy=mixed"], "it needs --bits=4"),
        (["--bits=4", "--group_size=0"], "--group_size=0 is invalid: must be an integer >= 1"),
        (["--bits=4", "--group_size=12"], "--group_size=12 is invalid: must divide"),
        (["--bits=4", "--policy=mixed", "--keep_fraction=2"], "--keep_fraction=2.0 is invalid"),
        (["--bits=8", "--source_is_quantized"], "already quantized (moe.expert_bits=8)"),
    ],
)
def test_bad_flags_exit_2_with_one_line(source_run, int8_run, tmp_path, capsys, flags, named):
    workdir = source_run
    if "--source_is_quantized" in flags:
        workdir, flags = int8_run[0], flags[:-1]
    argv = [f"--workdir={workdir}", f"--out={tmp_path / 'o'}", *flags]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own checks (choices, types)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert named in err, err
    assert not (tmp_path / "o").exists()


def test_frozen_optimizer_is_adamw_on_the_trainable_params_alone():
    rng = np.random.default_rng(0)
    params = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
        "experts": {
            "wo": jnp.asarray(rng.integers(-8, 8, (2, 4, 3)), jnp.int8),
            "wo_scale": jnp.asarray(rng.uniform(0.1, 1, (2, 1, 3)), jnp.float32),
            "wi_up": jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32),
            "other_scale": jnp.asarray(rng.uniform(size=(3,)), jnp.float32),
        },
    }
    frozen = frozen_params(params)
    # Integer leaves and the scale beside one; a float weight or an unrelated "_scale" trains.
    assert frozen == {
        "dense": {"kernel": False},
        "experts": {"wo": True, "wo_scale": True, "wi_up": False, "other_scale": False},
    }
    opt = _config(1).opt
    opt.update(grad_clip=0.5, weight_decay=0.1, warmup_steps=0)
    tx, plain = make_optimizer(opt, 10), make_optimizer(opt, 10)

    def trainable_part(tree):
        return {
            "dense": tree["dense"],
            "experts": {k: tree["experts"][k] for k in ("wi_up", "other_scale")},
        }

    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    grads["experts"]["wo"] = jnp.zeros_like(params["experts"]["wo"])  # as the train step has it
    start, trainable = params, trainable_part(params)
    state, ref_state = tx.init(params), plain.init(trainable)
    # No optimizer state for the frozen leaves: as many state entries as AdamW on the rest.
    assert sum(x.size for x in jax.tree.leaves(state)) == sum(
        x.size for x in jax.tree.leaves(ref_state)
    )
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        ref_updates, ref_state = plain.update(trainable_part(grads), ref_state, trainable)
        trainable = optax.apply_updates(trainable, ref_updates)
    for name in ("wo", "wo_scale"):
        assert params["experts"][name].dtype == start["experts"][name].dtype
        np.testing.assert_array_equal(params["experts"][name], start["experts"][name])
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-6),
        trainable_part(params),
        trainable,
    )
    assert not np.array_equal(params["dense"]["kernel"], start["dense"]["kernel"])
    # Without frozen leaves the optimizer is the plain chain: the same state as before.
    float_params = {"dense": params["dense"]}
    chain_state = with_frozen_params(optax.adamw(1e-3)).init(float_params)
    assert jax.tree.structure(chain_state) == jax.tree.structure(
        optax.adamw(1e-3).init(float_params)
    )
