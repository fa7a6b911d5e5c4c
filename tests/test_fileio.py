import os
import stat

import pytest

from ufm.fileio import atomic_write


def test_text_bytes_and_callback(tmp_path):
    assert atomic_write(tmp_path / "a" / "t.txt", "héllo").read_text() == "héllo"
    assert atomic_write(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write(tmp_path / "c.bin", lambda f: f.write(b"xyz")).read_bytes() == b"xyz"
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []


def test_permissions_private_or_umask(tmp_path):
    private = atomic_write(tmp_path / "p", "x", private=True)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    mask = os.umask(0)
    os.umask(mask)
    public = atomic_write(tmp_path / "q", "x")
    assert stat.S_IMODE(public.stat().st_mode) == 0o666 & ~mask


def test_failure_keeps_the_old_file(tmp_path):
    target = atomic_write(tmp_path / "r.txt", "old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old" and not list(tmp_path.glob("*.tmp"))


def test_check_writable_refuses_folders_and_missing_folders(tmp_path):
    from ufm.fileio import check_writable

    assert check_writable(tmp_path / "r.json") == tmp_path / "r.json"
    (tmp_path / "old.json").write_text("{}")
    assert check_writable(tmp_path / "old.json", what="--x") == tmp_path / "old.json"  # replaced atomically later
    with pytest.raises(ValueError, match=r"^--out: .* is a folder; give a file name inside it"):
        check_writable(tmp_path)
    with pytest.raises(ValueError, match=r"^--report: the folder .*missing does not exist; create it"):
        check_writable(tmp_path / "missing" / "r.json", what="--report")


def test_check_writable_refuses_a_readonly_folder(tmp_path):
    from ufm.fileio import check_writable

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root may write anywhere: nothing to refuse
            pytest.skip("running as a user that may write in read-only folders (root)")
        with pytest.raises(ValueError, match="cannot write in the folder"):
            check_writable(ro / "r.json")
    finally:
        ro.chmod(0o700)
