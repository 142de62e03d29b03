import pytest

from t5hooks.atomic import atomic_path


def test_success_replaces_and_leaves_no_temp(tmp_path):
    final = tmp_path / "a.bin"
    final.write_bytes(b"old")
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"new")
        assert final.read_bytes() == b"old"  # not visible before the block ends
    assert final.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_failure_keeps_previous_file(tmp_path):
    final = tmp_path / "a.bin"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="verification failed"), atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("verification failed")
    assert final.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_no_overwrite_refuses_before_writing(tmp_path):
    final = tmp_path / "a.bin"
    final.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already exists"), atomic_path(final, overwrite=False):
        raise AssertionError("body must not run")
    assert final.read_bytes() == b"old"
