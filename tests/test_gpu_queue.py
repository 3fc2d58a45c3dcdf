"""benchmarks/gpu_queue.sh: the jobs that fit the budget run in order, the others are skipped, and the archive
holds the results each finished job wrote and every job's log."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_queue.sh"


def test_queue_runs_what_fits_and_archives_new_results(tmp_path):
    results = tmp_path / "tree" / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "old.json").write_text("{}")  # there before the queue: not archived
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(
        "# a comment\n"
        "5 tree echo one > benchmarks/results/a_run1.json\n"
        "100 tree echo never > benchmarks/results/b_run1.json\n"
        "5 tree echo two > benchmarks/results/c_run1.json; false\n"
    )
    archive = tmp_path / "out.tgz"
    run = subprocess.run(
        ["bash", str(SCRIPT), str(jobs), "60", str(archive)], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "skip job 2" in run.stdout and "rc 1" in run.stdout and "queue done" in run.stdout
    with tarfile.open(archive) as tar:
        names = sorted(Path(n).name for n in tar.getnames() if not n.endswith("logs"))
    assert names == ["a_run1.json", "c_run1.json", "job1.log", "job3.log"]
    assert not (results / "b_run1.json").exists()


PENDING = SCRIPT.parent / "queues" / "pending.txt"


def _pending_jobs() -> list[list[str]]:
    lines = [line.split() for line in PENDING.read_text().splitlines()]
    return [words for words in lines if words and not words[0].startswith("#")]


def test_pending_gpu_runs_name_modes_and_keys_that_exist():
    """The queue waiting for a GPU: each job an estimate, a tree and a gpu_checks.sh mode it has, and every
    train48 job's keys ones moefuse train knows, each given a value (their values are checked on the GPU, where
    the GPU-only keys apply)."""
    from moefuse.train.config import known_keys

    checks = (SCRIPT.parent / "gpu_checks.sh").read_text()
    known = known_keys()
    jobs = _pending_jobs()
    assert jobs
    for est, tree, *command in jobs:
        assert int(est) > 0 and tree in (".", ".gpu/tree-7d731e2")
        assert command[:2] == ["bash", "benchmarks/gpu_checks.sh"] and f"\n{command[2]})\n" in checks
        if command[2] == "train48":
            keys = command[5::2]  # after OUT and NAME: --key value pairs
            assert all(k.startswith("--") and k[2:] in known for k in keys), keys
            assert len(command[5:]) == 2 * len(keys)
