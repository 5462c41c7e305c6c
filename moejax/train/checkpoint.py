"""Checkpointing with orbax: train state, data iterator state and the config, per step.

One orbax `CheckpointManager` under `<workdir>/checkpoints` with three items per step:
  state  - the TrainState (params, opt_state, moe_state, step, rng, skipped), saved
           asynchronously from the devices and restored directly into its shardings;
  data   - the grain iterator state (JSON), so a restart continues with the next batch;
  config - the run's ConfigDict as JSON (what produced these weights).

Orbax writes each step into a temporary directory and renames it only once every item is
written (the commit); `latest_step()` lists committed steps only, so a save interrupted by a
crash is ignored on restart and the previous committed step is used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from moejax.train.state import TrainState

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves every `every` steps (async), keeps the last `keep`, restores the latest."""

    def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True):
        """Opens (and creates) the checkpoint directory.

        Args:
          directory: where the step directories go.
          every: save interval in steps (a save at other steps needs `force=True`).
          keep: committed checkpoints to keep (older ones are deleted).
          async_save: write in a background thread while training continues.
        """
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )

    def latest_step(self) -> int | None:
        """The newest committed step (unfinished saves are not listed), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: TrainState,
        data_state: dict[str, Any],
        config_json: str,
        *,
        force: bool = False,
    ) -> bool:
        """Starts saving `state` at `step` when the interval says so (or `force`).

        Returns:
          True when a save was started.
        """
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(json.loads(config_json)),
            ),
            force=force,
        )

    def restore(
        self, target: TrainState, step: int | None = None
    ) -> tuple[TrainState, dict[str, Any], dict[str, Any]] | None:
        """Restores a committed step (default: the latest) into `target`'s shapes and shardings.

        Args:
          target: a TrainState of jax.ShapeDtypeStruct (with shardings), see
            `moejax.train.state.abstract_state`.
          step: which step; None = the latest.

        Returns:
          (state, data_state, config_dict), or None when there is no committed checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        log.info("restored checkpoint step %d from %s", step, self.directory)
        return restored.state, restored.data, restored.config

    def restore_config(self, step: int | None = None) -> dict[str, Any] | None:
        """The config (as a dict) saved with a committed step (default: the latest), read
        without the state: what a tool needs to know the shapes to restore the state into.

        Returns:
          The config dict, or None when there is no committed checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored.config

    def wait(self) -> None:
        """Blocks until a pending async save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
