"""Run metrics after a resume: metrics.jsonl and TensorBoard hold each step once."""

import json
import struct
import time
from pathlib import Path

import numpy as np
from tensorboardX.proto import event_pb2
from tensorboardX.proto.event_pb2 import SessionLog

from moejax.train.metrics import MetricsWriter, read_metrics


def read_events(logdir: Path) -> list[event_pb2.Event]:
    """Every event of the run's event files, in the order TensorBoard loads them.

    TensorBoard is not a dependency, so this reads the TFRecord framing itself: per record a
    uint64 length, its masked crc32c (uint32), the serialized Event and the data's crc32c.
    """
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):  # by name = creation time
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            pos += 12
            events.append(event_pb2.Event.FromString(data[pos : pos + length]))
            pos += length + 4
    return events


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars per tag as TensorBoard shows them: a SessionLog.START at step s (tensorboardX's
    purge_step marker) hides every earlier event with step >= s, as in TensorBoard's
    EventAccumulator (purge_orphaned_data=True)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for event in read_events(logdir):
        if event.HasField("session_log") and event.session_log.status == SessionLog.START:
            for tag, points in scalars.items():
                scalars[tag] = [(s, v) for s, v in points if s < event.step]
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def _write_steps(workdir: Path, steps: range, scale: float, *, start_step: int = 0) -> None:
    writer = MetricsWriter(workdir, start_step=start_step)
    load_NxE = np.full((2, 4), 0.25)
    for step in steps:
        writer.write("train", step, {"loss": scale * step}, expert_load=load_NxE)
        if step % 5 == 0:
            writer.write("eval", step, {"ce_loss": scale * step + 0.5})
    writer.close()


def _wait_for_next_second() -> None:
    # tensorboardX names an event file by its creation time in whole seconds (and opens it with
    # "wb"): two writers started within one second would share, and truncate, one file.
    time.sleep(1.05 - time.time() % 1)


def test_resume_drops_later_steps_from_jsonl_and_tensorboard(tmp_path):
    # A run logged steps 1..10, but its last checkpoint is step 5: the resumed run starts there
    # and logs 6..8 (new values) before it is stopped again.
    _write_steps(tmp_path, range(1, 11), 1.0)
    _wait_for_next_second()
    _write_steps(tmp_path, range(6, 9), 10.0, start_step=5)

    expected_train = [(s, float(s)) for s in range(1, 6)] + [(s, 10.0 * s) for s in (6, 7, 8)]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines if r["split"] == "train"] == expected_train
    assert [(r["step"], r["ce_loss"]) for r in lines if r["split"] == "eval"] == [(5, 5.5)]
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs["train"]] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert recs["train"][0]["expert_load"] == [[0.25] * 4] * 2

    tb = tmp_path / "tensorboard"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2
    scalars = tensorboard_scalars(tb)
    assert scalars["train/loss"] == expected_train
    assert scalars["eval/ce_loss"] == [(5, 5.5)]
    for tag in ("train/expert_load_max/layer1", "train/expert_load_min/layer0"):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_fresh_run_purges_nothing(tmp_path):
    _write_steps(tmp_path, range(1, 4), 1.0)
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    starts = [e.step for e in read_events(tmp_path / "tensorboard") if e.HasField("session_log")]
    assert starts == [1]  # purge_step = start_step + 1: nothing logged before step 1 to hide
