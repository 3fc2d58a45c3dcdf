"""Which source a measurement ran: the commit, and whether the tree differed from it.

In a git checkout git answers. A copy of the tree without ``.git`` (a GPU machine's) is answered by a stamp that
``python -m moefuse.bench.provenance`` writes at the checkout's root before the copy: the commit, git's dirty
flag, and a hash of every source file's contents. On the copy the hash is taken again; a tree changed after
the stamp counts as dirty. Where git finds the tree dirty, a stamp that matches every file (the same files, the
same contents) answers instead: a copy can carry a ``.git`` older than its files. The measurements' own output
(``benchmarks/results/``) is not source: a result written by an earlier run of the same tree leaves it clean.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

STAMP_FILE = ".moefuse-provenance.json"
# The checkout's root, where the source tree runs from one (src/moefuse/bench/provenance.py).
SOURCE_ROOT = Path(__file__).resolve().parents[3]
RESULTS_DIR = "benchmarks/results/"  # what the tools write; left out of the source


def _git(*args: str, root: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, timeout=20, check=True
    ).stdout


def _source_files(root: Path) -> list[str]:
    """Tracked and untracked-not-ignored files (what the device tool copies), the stamp and results left out."""
    listed = _git("ls-files", "--cached", "--others", "--exclude-standard", "-z", root=root).split("\0")
    return sorted(
        f for f in listed if f and f != STAMP_FILE and not f.startswith(RESULTS_DIR) and (root / f).is_file()
    )


def _git_dirty(root: Path) -> bool:
    """Whether git sees a change to the source (results left out)."""
    return bool(_git("status", "--porcelain", "--", ".", f":(exclude){RESULTS_DIR}", root=root).strip())


def tree_hash(root: Path, files: list[str]) -> str:
    """SHA-256 over the names and contents of ``files`` under ``root`` (a missing file counts as changed)."""
    digest = hashlib.sha256()
    for name in files:
        path = root / name
        digest.update(name.encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
        digest.update(b"\0")
    return digest.hexdigest()


def write_stamp(root: Path = SOURCE_ROOT) -> dict:
    """Stamp the checkout at ``root``: commit, dirty flag, and the hash of its source files."""
    files = _source_files(root)
    stamp = {
        "commit": _git("rev-parse", "HEAD", root=root).strip(),
        "dirty": _git_dirty(root),
        "files": files,
        "sha256": tree_hash(root, files),
    }
    (root / STAMP_FILE).write_text(json.dumps(stamp) + "\n")
    return stamp


def _from_git(root: Path) -> dict | None:
    try:
        if _git("rev-parse", "--show-toplevel", root=root).strip() != str(root):
            return None
        commit = _git("rev-parse", "HEAD", root=root).strip()
        dirty = _git_dirty(root)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty, "source": "git"}


def _from_stamp(root: Path, files: list[str] | None = None) -> dict | None:
    """The stamp at ``root``, dirty if a stamped file changed or (given the tree's ``files``) the list differs."""
    path = root / STAMP_FILE
    if not path.is_file():
        return None
    try:
        stamp = json.loads(path.read_text())
        changed = tree_hash(root, stamp["files"]) != stamp["sha256"] or (
            files is not None and files != stamp["files"]
        )
        return {"commit": stamp["commit"], "dirty": stamp["dirty"] or changed, "source": STAMP_FILE}
    except (ValueError, KeyError, TypeError) as error:  # no result is written under an unreadable provenance
        raise RuntimeError(
            f"{path} is not a stamp written by `python -m moefuse.bench.provenance` ({type(error).__name__}: "
            f"{error}); write it again in the checkout before copying the tree"
        ) from None


def source_provenance(root: Path = SOURCE_ROOT) -> dict:
    """``{"commit", "dirty", "source"}`` of the moefuse source running: from git, else from the stamp, else
    unknown (an installed wheel)."""
    if not (root / "src" / "moefuse").is_dir():
        return {"commit": "unknown", "dirty": None, "source": "installed package"}
    git = _from_git(root)
    if git is not None and git["dirty"]:
        # A copy may carry a .git older than its files (a GPU machine's): a stamp matching every file there names
        # them exactly.
        stamp = _from_stamp(root, _source_files(root))
        if stamp is not None and not stamp["dirty"]:
            return stamp
    return git or _from_stamp(root) or {"commit": "unknown", "dirty": None, "source": "none"}


def commit_label(provenance: dict) -> str:
    """``<commit>`` or ``<commit>+dirty`` (``unknown`` where none is known)."""
    return provenance["commit"] + ("+dirty" if provenance["dirty"] else "")


if __name__ == "__main__":
    written = write_stamp()
    print(
        f"wrote {SOURCE_ROOT / STAMP_FILE}: {written['commit']}{'+dirty' if written['dirty'] else ''}, "
        f"{len(written['files'])} files",
        file=sys.stderr,
    )
