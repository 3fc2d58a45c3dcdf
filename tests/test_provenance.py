"""Provenance recorded by the tool: the commit and dirty flag from git, or from the stamp in a copy without
``.git`` (or with an older one); result files named per run and never overwritten; the version from the source tree."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from moefuse._version import package_version
from moefuse.bench.measure import kept_path, write_report
from moefuse.bench.provenance import STAMP_FILE, commit_label, source_provenance, write_stamp


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "src" / "moefuse").mkdir(parents=True)
    (root / "src" / "moefuse" / "ops.py").write_text("x = 1\n")
    (root / ".gitignore").write_text(f"/{STAMP_FILE}\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    return root


def test_git_checkout_gives_commit_and_dirty_flag(checkout: Path):
    commit = _git(checkout, "rev-parse", "HEAD")
    assert source_provenance(checkout) == {"commit": commit, "dirty": False, "source": "git"}
    (checkout / "src" / "moefuse" / "ops.py").write_text("x = 2\n")
    assert commit_label(source_provenance(checkout)) == commit + "+dirty"


def test_copy_without_git_reads_the_stamp_and_sees_later_changes(checkout: Path, tmp_path: Path):
    commit = _git(checkout, "rev-parse", "HEAD")
    write_stamp(checkout)
    copy = tmp_path / "copy"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git"))
    assert source_provenance(copy) == {"commit": commit, "dirty": False, "source": STAMP_FILE}
    (copy / "src" / "moefuse" / "ops.py").write_text("x = 3\n")  # changed after the stamp
    assert source_provenance(copy)["dirty"] is True
    (copy / "src" / "moefuse" / "ops.py").unlink()
    assert source_provenance(copy)["dirty"] is True


def test_results_written_by_a_run_leave_the_tree_clean(checkout: Path, tmp_path: Path):
    commit = _git(checkout, "rev-parse", "HEAD")
    write_stamp(checkout)
    copy = tmp_path / "copy"
    shutil.copytree(checkout, copy)  # with its .git, as a GPU machine's copy
    (copy / "benchmarks" / "results").mkdir(parents=True)
    (copy / "benchmarks" / "results" / "block_run1.json").write_text("{}\n")  # an earlier job's result
    assert source_provenance(copy) == {"commit": commit, "dirty": False, "source": "git"}
    (copy / "src" / "moefuse" / "ops.py").write_text("x = 4\n")
    assert source_provenance(copy)["dirty"] is True


def test_stamp_of_a_dirty_tree_stays_dirty(checkout: Path, tmp_path: Path):
    (checkout / "src" / "moefuse" / "new.py").write_text("y = 1\n")  # untracked, travels with the copy
    stamp = write_stamp(checkout)
    assert stamp["dirty"] and "src/moefuse/new.py" in stamp["files"]
    copy = tmp_path / "copy"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git"))
    assert source_provenance(copy)["dirty"] is True


def test_copy_with_an_older_git_reads_the_stamp_that_matches_its_files(checkout: Path, tmp_path: Path):
    first = _git(checkout, "rev-parse", "HEAD")
    (checkout / "src" / "moefuse" / "ops.py").write_text("x = 2\n")
    _git(checkout, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "second")
    second = _git(checkout, "rev-parse", "HEAD")
    write_stamp(checkout)
    copy = tmp_path / "copy"
    shutil.copytree(checkout, copy)
    _git(
        copy, "reset", "-q", "--soft", first
    )  # the copy's .git is the first commit's; its files the second's
    assert source_provenance(copy) == {"commit": second, "dirty": False, "source": STAMP_FILE}
    (copy / "src" / "moefuse" / "new.py").write_text("y = 1\n")  # a file the stamp does not list
    assert source_provenance(copy) == {"commit": first, "dirty": True, "source": "git"}
    (copy / "src" / "moefuse" / "new.py").unlink()
    (copy / "src" / "moefuse" / "ops.py").write_text("x = 3\n")  # a stamped file changed
    assert source_provenance(copy) == {"commit": first, "dirty": True, "source": "git"}


def test_unreadable_stamp_is_a_clear_error(checkout: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git"))
    (copy / STAMP_FILE).write_text('{"commit": "abc"}')  # no file list, no hash
    with pytest.raises(RuntimeError, match="is not a stamp written by"):
        source_provenance(copy)


def test_unreadable_stamp_beside_a_dirty_git_tree_is_a_clear_error(checkout: Path):
    (checkout / "src" / "moefuse" / "ops.py").write_text("x = 2\n")  # git: dirty, so the stamp is read
    (checkout / STAMP_FILE).write_text("not json")
    with pytest.raises(RuntimeError, match="is not a stamp written by"):
        source_provenance(checkout)


def test_no_source_tree_is_unknown(tmp_path: Path):
    assert source_provenance(tmp_path)["commit"] == "unknown"


def test_runs_are_kept_not_overwritten(tmp_path: Path):
    env = {"moefuse_commit": "0123456789abcdef+dirty"}
    path = kept_path(tmp_path / "block_H100.json", env)
    assert path.name.startswith("block_H100_0123456-dirty_") and path.suffix == ".json"
    write_report({"a": 1}, path)
    with pytest.raises(SystemExit, match="runs are kept, not overwritten"):
        write_report({"a": 2}, path)
    assert json.loads(path.read_text()) == {"a": 1}


def test_version_matches_pyproject():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert f'version = "{package_version()}"' in pyproject
