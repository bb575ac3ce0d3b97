"""gear_lab.files: the one output check and the one atomic write every writer uses."""

from __future__ import annotations

import errno
import os

import pytest

from gear_lab.errors import DumpExistsError, OutputError, OutputExistsError, first_line
from gear_lab.files import GuardedFile, atomic_write, check_output, writable_folder


def test_atomic_write_renames_into_place_with_default_permissions(tmp_path):
    target = tmp_path / "out.csv"
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.csv.")
        tmp.write_text("a,b\n")
        assert not target.exists()
    assert target.read_text() == "a,b\n"
    assert os.listdir(tmp_path) == ["out.csv"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError, OutputError])
def test_atomic_write_leaves_nothing_on_any_exception(tmp_path, error):
    target = tmp_path / "out.csv"
    with pytest.raises(error), atomic_write(target) as tmp:
        tmp.write_text("partial")
        raise error("stop")
    assert os.listdir(tmp_path) == []


def test_atomic_write_of_a_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_write(target, folder=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").read_text() == "{}"
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "other", folder=True) as tmp:
        (tmp / "weights").write_bytes(b"x")
        raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_atomic_write_turns_os_errors_into_one_line(tmp_path):
    target = tmp_path / "out.csv"
    no_space = r"^no space left on .*out\.csv: nothing written$"
    with pytest.raises(OutputError, match=no_space), atomic_write(target):
        raise OSError(errno.ENOSPC, "No space left on device")
    io_error = r"^cannot write .*: Input/output error; nothing written$"
    with pytest.raises(OutputError, match=io_error), atomic_write(target):
        raise OSError(errno.EIO, "Input/output error")
    assert os.listdir(tmp_path) == []


def test_atomic_write_refuses_a_target_that_appeared(tmp_path):
    target = tmp_path / "d.h5"
    with (
        pytest.raises(DumpExistsError, match="appeared meanwhile"),
        atomic_write(target, overwrite=False, exists_error=DumpExistsError) as tmp,
    ):
        tmp.write_text("new")
        target.write_text("theirs")
    assert os.listdir(tmp_path) == ["d.h5"] and target.read_text() == "theirs"


def test_atomic_write_never_writes_through_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    target = tmp_path / "out.csv"
    target.symlink_to(victim)
    with atomic_write(target) as tmp:
        tmp.write_text("new")
    assert victim.read_text() == "keep"
    assert not target.is_symlink() and target.read_text() == "new"


def test_check_output(tmp_path):
    existing = tmp_path / "x.csv"
    existing.write_text("")
    assert check_output(tmp_path / "new.csv") == tmp_path / "new.csv"
    assert check_output(existing, overwrite=True) == existing
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_output(existing)
    with pytest.raises(DumpExistsError):
        check_output(existing, exists_error=DumpExistsError)
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path, overwrite=True)
    with pytest.raises(OutputError, match="not a regular file"):
        check_output("/dev/null", overwrite=True)
    with pytest.raises(OutputError, match="does not exist"):
        check_output(tmp_path / "no" / "x.csv")
    assert check_output(tmp_path / "a" / "b" / "x.csv", make_parents=True)
    assert not (tmp_path / "a").exists()  # checked, nothing created
    with pytest.raises(OutputError, match="is not a folder"):
        check_output(existing / "x.csv", make_parents=True)
    assert sorted(os.listdir(tmp_path)) == ["x.csv"]  # the probe leaves nothing


@pytest.mark.parametrize("path", ["/proc/gear-lab.csv", "/proc/self/gear-lab/x.csv", "/sys/x.csv"])
def test_check_output_refuses_pseudo_file_systems(path):
    with pytest.raises(OutputError, match=r"cannot write in|does not exist") as info:
        check_output(path, make_parents=True)
    assert "\n" not in str(info.value)


def test_writable_folder_refuses_proc():
    with pytest.raises(OutputError, match="cannot write in /proc"):
        writable_folder("/proc/gear-lab-cache", make=True)


def test_guarded_file_records_failures_and_drops_later_writes(tmp_path):
    with GuardedFile(tmp_path / "f", "w+") as raw:
        assert raw.write(b"abc") == 3
        raw.check()
        raw.failure = OSError(errno.ENOSPC, "No space left on device")
        assert raw.write(b"def") == 3  # reported as written, dropped
        with pytest.raises(OSError, match="No space"):
            raw.check()
    assert (tmp_path / "f").read_bytes() == b"abc"


def test_first_line():
    assert first_line(ValueError("one\ntwo")) == "one"
    assert first_line(KeyError()) == "KeyError"
