"""Run one benchmark at two git revisions, alternating, and compare their ratio columns.

    python benchmarks/compare_revisions.py --old f9062e1 --new HEAD --rounds 3 -- \
        benchmarks/moe_layer.py --repeats 3 --ragged_repeats 1 --skip_torch

Each revision is checked out into a temporary `git worktree` and its own copy of the benchmark
script runs there with that worktree first on PYTHONPATH (so the script and the library it
imports are both of that revision). Runs alternate old, new, old, new, ... so that a change in
machine load hits both alike; within each run the benchmark already times its rows against its
own baseline in interleaved rounds. The benchmark must accept `--out PREFIX` and write
PREFIX.json with a "rows" list of dicts; rows are matched across revisions by the columns named
in --key and compared on the columns named in --ratio (medians over rounds). Results: a table on
stdout and --out.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

RESULTS = pathlib.Path(__file__).parent / "results"


def resolve(repo: pathlib.Path, rev: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", rev],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def run_once(worktree: pathlib.Path, script: str, script_args: list[str], out: pathlib.Path):
    """One run of `script` (a path relative to the repository root) inside `worktree`; returns
    the rows it wrote and the moejax package path it imported (to prove the revision)."""
    env = dict(os.environ, PYTHONPATH=str(worktree), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(worktree / script), *script_args, "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=worktree, env=env, stdout=subprocess.DEVNULL)
    probe = subprocess.run(
        [sys.executable, "-c", "import moejax; print(moejax.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=worktree,
        env=env,
    )
    imported = probe.stdout.strip()
    if not imported.startswith(str(worktree)):
        raise RuntimeError(f"{worktree}: imported moejax from {imported}, not the worktree")
    return json.loads(out.with_suffix(".json").read_text())["rows"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--old", required=True, help="git revision before the change")
    p.add_argument("--new", default="HEAD", help="git revision after the change")
    p.add_argument("--rounds", type=int, default=3, help="runs per revision, alternating")
    p.add_argument("--key", default="impl,routing", help="columns that identify a row")
    p.add_argument("--ratio", default="wall_vs_dense,cpu_vs_dense", help="columns to compare")
    p.add_argument("--out", default=str(RESULTS / "compare_revisions"))
    p.add_argument("script", help="benchmark script, relative to the repository root")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    repo = pathlib.Path(__file__).resolve().parent.parent
    keys, ratios = args.key.split(","), args.ratio.split(",")
    revs = {"old": resolve(repo, args.old), "new": resolve(repo, args.new)}

    samples: dict[str, dict[tuple, dict[str, list[float]]]] = {"old": {}, "new": {}}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for side, rev in revs.items():
            trees[side] = pathlib.Path(tmp) / side
            subprocess.run(
                ["git", "-C", str(repo), "worktree", "add", "--detach", str(trees[side]), rev],
                check=True,
                capture_output=True,
            )
        try:
            for r in range(args.rounds):
                for side in ("old", "new"):
                    out = pathlib.Path(tmp) / f"{side}{r}"
                    rows = run_once(trees[side], args.script, args.script_args, out)
                    for row in rows:
                        key = tuple(row[k] for k in keys)
                        per = samples[side].setdefault(key, {c: [] for c in ratios})
                        for c in ratios:
                            per[c].append(float(row[c]))
                    print(f"round {r + 1}/{args.rounds} {side} ({revs[side]}) done", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
                    check=False,
                    capture_output=True,
                )

    header = " ".join([args.script, *args.script_args])
    lines = [
        f"`{header}` at {revs['old']} (old) and {revs['new']} (new), {args.rounds} alternating "
        "runs each; medians over runs",
        "",
        "| " + " | ".join(keys) + " | " + " | ".join(f"{c} old | {c} new" for c in ratios) + " |",
        "|" + "---|" * (len(keys) + 2 * len(ratios)),
    ]
    table = []
    for key in samples["new"]:
        old = samples["old"].get(key)
        row = dict(zip(keys, key, strict=True))
        cells = []
        for c in ratios:
            new_med = statistics.median(samples["new"][key][c])
            old_med = statistics.median(old[c]) if old else None
            row[f"{c}_old"], row[f"{c}_new"] = old_med, new_med
            cells += ["-" if old_med is None else f"{old_med:.2f}x", f"{new_med:.2f}x"]
        table.append(row)
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    payload = {"revisions": revs, "command": header, "rounds": args.rounds, "rows": table}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
