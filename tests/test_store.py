import h5py
import pytest

from hpcprune.store import SCHEMA_VERSION, RunDirLocked, RunFile, RunFileError, RunLock


def test_transaction_is_all_or_nothing(tmp_path):
    rf = RunFile(str(tmp_path / "run.h5"))
    rf.create("a: 1\n", {"world_size": 1})
    with pytest.raises(RuntimeError):
        with rf.write() as f:
            f.create_group("baseline").attrs["complete"] = True
            raise RuntimeError("killed mid-write")
    assert rf.done_stages() == []
    assert not (tmp_path / "run.h5.tmp").exists()
    with rf.write() as f:
        f.create_group("baseline").attrs["complete"] = True
    assert rf.done_stages() == ["baseline"]


def test_foreign_and_newer_files_refused(tmp_path):
    foreign = tmp_path / "other.h5"
    with h5py.File(foreign, "w") as f:
        f.attrs["format"] = "someone-else"
    with pytest.raises(RunFileError, match="not an hpcprune run file"):
        RunFile(str(foreign)).check()
    newer = RunFile(str(tmp_path / "newer.h5"))
    newer.create("a: 1\n", {})
    with h5py.File(newer.path, "a") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(RunFileError, match="newer"):
        newer.check()
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # truncated
    with pytest.raises(RunFileError, match="not a readable HDF5"):
        RunFile(str(junk)).check()


def test_lock_is_exclusive_and_released(tmp_path):
    a = RunLock(str(tmp_path)).acquire()
    with pytest.raises(RunDirLocked, match="in use by pid"):
        RunLock(str(tmp_path)).acquire()
    a.release()
    RunLock(str(tmp_path)).acquire().release()
