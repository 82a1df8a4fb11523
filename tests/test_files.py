import os
import stat

import pytest

from edgelm.files import atomic_dir, atomic_path, write_json


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_outputs_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "x").write_text("x")
            # As onnx writes an external data file.
            (tmp / "model.onnx.data").write_bytes(b"\0")
            os.chmod(tmp / "model.onnx.data", 0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "folder" / "model.onnx.data").stat().st_mode) == 0o644


def test_atomic_dir_removes_leftovers_of_killed_writer(tmp_path):
    leftover = tmp_path / ".export.abc123.tmp"
    leftover.mkdir()
    (leftover / "model.onnx").write_text("partial")
    with atomic_dir(tmp_path / "export") as tmp:
        (tmp / "model.onnx").write_text("complete")
    assert not leftover.exists()
    assert (tmp_path / "export" / "model.onnx").read_text() == "complete"
