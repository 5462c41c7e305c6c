"""Run metrics: JSON lines + TensorBoard events while training, PNG plots at the end.

`<workdir>/metrics.jsonl` holds one record per logged step and split:
  {"split": "train" | "eval", "step": int, "<metric>": float, ..., "expert_load": [[...]]}
(expert_load is [N, E]: per MoE layer, the fraction of routed assignments each expert got).
A resumed run first drops the records past its restored step (they will be logged again), so
metrics.jsonl and TensorBoard (a purge of the later steps) hold each step once.

Only process 0 writes (every process computes the same replicated metrics).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends metric records to metrics.jsonl and TensorBoard (tensorboardX) event files."""

    def __init__(self, workdir: str | Path, *, start_step: int = 0):
        """Opens the run's metric files, dropping what a resumed run will log again.

        Args:
          workdir: the run directory.
          start_step: the step the run (re)starts from: records with a larger step, written
            before an interruption that lost their checkpoint, are removed.
        """
        self._active = jax.process_index() == 0
        self._path = Path(workdir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if self._active:
            _truncate_records(self._path, start_step)
            self._file = open(self._path, "a")  # noqa: SIM115 - closed in close()
            try:
                from tensorboardX import SummaryWriter

                # TensorBoard hides every earlier event with step >= purge_step.
                # The suffix keeps two writers opened within one second (tensorboardX names
                # event files by the second) from overwriting each other's file.
                self._tb = SummaryWriter(
                    str(Path(workdir) / "tensorboard"),
                    purge_step=start_step + 1,
                    filename_suffix=f".from{start_step}",
                )
            except ImportError:
                log.warning("tensorboardX not installed: no TensorBoard events")

    def write(
        self,
        split: str,
        step: int,
        scalars: dict[str, Any],
        *,
        expert_load: np.ndarray | None = None,
    ) -> None:
        """Records scalars (and optionally the [N, E] expert load) for one step."""
        if not self._active:
            return
        record: dict[str, Any] = {"split": split, "step": int(step)}
        # A vector value ([N], one per MoE layer) is kept as a list.
        record.update({k: _json_value(v) for k, v in scalars.items()})
        if expert_load is not None:
            record["expert_load"] = np.asarray(expert_load, dtype=np.float64).round(5).tolist()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                v = np.asarray(v)
                if v.ndim == 0:
                    self._tb.add_scalar(f"{split}/{k}", float(v), step)
                for layer, x in enumerate(v.reshape(-1) if v.ndim else ()):
                    self._tb.add_scalar(f"{split}/{k}/layer{layer}", float(x), step)
            if expert_load is not None:
                load = np.asarray(expert_load)
                # Imbalance summaries per layer (E scalars per layer would swamp the UI).
                for layer in range(load.shape[0]):
                    for stat in ("max", "min"):
                        self._tb.add_scalar(
                            f"{split}/expert_load_{stat}/layer{layer}",
                            float(getattr(load[layer], stat)()),
                            step,
                        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _json_value(v: Any) -> float | list[float]:
    v = np.asarray(v, dtype=np.float64)
    return float(v) if v.ndim == 0 else v.round(5).tolist()


def _truncate_records(path: Path, start_step: int) -> None:
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= start_step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)  # atomic: an interruption leaves the old or the new file


def read_metrics(workdir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Records of metrics.jsonl by split, sorted by step, the last record per step kept."""
    path = Path(workdir) / "metrics.jsonl"
    by_split: dict[str, dict[int, dict[str, Any]]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                by_split.setdefault(r["split"], {})[r["step"]] = r
    return {s: [recs[k] for k in sorted(recs)] for s, recs in by_split.items()}


def write_plots(workdir: str | Path) -> list[Path]:
    """loss.png (train and validation loss), expert_load.png (per-layer load heatmaps) and
    experts_per_token.png (real experts per token, per layer, over training)."""
    if jax.process_index() != 0:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    recs = read_metrics(workdir)
    train, evals = recs.get("train", []), recs.get("eval", [])
    out = []
    if train or evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot([r["step"] for r in train], [r["ce_loss"] for r in train], label="train CE")
        if evals:
            ax.plot([r["step"] for r in evals], [r["ce_loss"] for r in evals], "o-", label="val CE")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out.append(workdir / "loss.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    spent = [r for r in train if r.get("experts_per_token_layers")]
    if spent:
        per_layer_SxN = np.array([r["experts_per_token_layers"] for r in spent])
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for layer in range(per_layer_SxN.shape[1]):
            ax.plot([r["step"] for r in spent], per_layer_SxN[:, layer], label=f"layer {layer}")
        ax.set_xlabel("step")
        ax.set_ylabel("real experts per token")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        out.append(workdir / "experts_per_token.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    loads = [r for r in train if "expert_load" in r]
    if loads:
        load_SxNxE = np.array([r["expert_load"] for r in loads])
        steps = [r["step"] for r in loads]
        n_layers, n_exp = load_SxNxE.shape[1], load_SxNxE.shape[2]
        fig, axes = plt.subplots(
            n_layers, 1, figsize=(7, 1.6 * n_layers + 0.8), squeeze=False, sharex=True
        )
        for layer in range(n_layers):
            ax = axes[layer, 0]
            im = ax.imshow(
                load_SxNxE[:, layer, :].T,
                aspect="auto",
                origin="lower",
                cmap="viridis",
                extent=(steps[0], steps[-1], -0.5, n_exp - 0.5),
                vmin=0.0,
                vmax=max(2.0 / n_exp, float(load_SxNxE.max())),
            )
            ax.set_ylabel(f"layer {layer}\nexpert")
            fig.colorbar(im, ax=ax, pad=0.01)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"expert load (fraction of assignments; balanced = {1 / n_exp:.3f})")
        fig.tight_layout()
        out.append(workdir / "expert_load.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    return out
