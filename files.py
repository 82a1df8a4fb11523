"""Atomic file and folder writes, so an interrupted stage never leaves a file a later stage reads.

Every writer puts its output under a temporary name in the same folder and renames it into
place at the end. A rename within one file system is atomic on POSIX.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _set_default_permissions(path: Path, is_dir: bool) -> None:
    # mkstemp and mkdtemp create 0600 files and 0700 folders. Give the result the permissions a
    # plain open() or mkdir() would have, so that other users and sync tools can read exports.
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_current_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to `path`; rename it to `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _set_default_permissions(tmp_path, is_dir=False)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def set_folder_permissions(folder: Path) -> None:
    """Give a folder made by mkdtemp, and its 0600 files, the permissions that mkdir and open() would."""
    _set_default_permissions(folder, is_dir=True)
    # onnx and safetensors write some files as 0600, as mkstemp does. Give those the usual permissions.
    for item in folder.rglob("*"):
        if item.is_file() and not item.is_symlink() and item.stat().st_mode & 0o777 == 0o600:
            _set_default_permissions(item, is_dir=False)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; replace `path` with it when the block succeeds.

    An existing `path` is removed only after the new folder is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A killed process leaves its temporary folder behind; only one writer per path is supported,
    # so any leftover belongs to an earlier, dead attempt.
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp_path
        set_folder_permissions(tmp_path)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp_path, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


# Files that mark a folder as an edgelm output. A model folder (config.json beside weights) counts too.
OUTPUT_MARKERS = ("edgelm_export.json", "sft_state.json", "mask_report.json")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")


def check_output_folder(path: str | os.PathLike, name: str = "--out") -> None:
    """Raise ValueError when `path` contains files but is neither an edgelm output nor a model folder.

    Outputs replace their whole folder (atomic_dir), so a folder of other files, such as the
    input data, would be lost. `name` is the flag or parameter that the message names.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} is a file; give a folder to write the output into")
    if not path.is_dir():
        return
    entries = sorted(entry.name for entry in path.iterdir())
    is_model = (path / "config.json").is_file() and any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS)
    if not entries or is_model or set(entries) & set(OUTPUT_MARKERS):
        return
    listed = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise ValueError(f"{name} {path} contains files that edgelm did not write ({listed}); the output replaces the "
                     f"whole folder, so give a new or empty folder")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_of_files(paths: list[Path]) -> str:
    """Return the hex SHA-256 over the names and bytes of `paths`, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_jsonl_with(path: str | os.PathLike, fields: tuple[str, ...], kind: str, fix: str) -> list[dict]:
    """Read a JSONL file whose rows must all have `fields`; raise ValueError naming the first row without them.

    `kind` names what the file should contain (for example "records") and `fix` how to make one.
    """
    rows = read_jsonl(path)
    for number, row in enumerate(rows, start=1):
        missing = [name for name in fields if name not in row]
        if missing:
            raise ValueError(f"{path}: row {number} has no {missing} field, so the file does not contain {kind} "
                             f"(its keys: {sorted(row)}); {fix}")
    return rows
