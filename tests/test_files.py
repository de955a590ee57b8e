"""calib_jax.files: atomic writes, directory locks."""

import os

import pytest

from calib_jax import files


def test_atomic_write_text_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "results.md"
    files.atomic_write_text(path, "first\n")
    assert path.read_text() == "first\n"
    files.atomic_write_text(path, "second, é\n")
    assert path.read_text(encoding="utf-8") == "second, é\n"
    assert os.listdir(path.parent) == ["results.md"]  # no temporary file left


def test_atomic_write_bytes(tmp_path):
    path = tmp_path / "trace.pb.gz"
    files.atomic_write_bytes(path, b"\x00\x01binary")
    assert path.read_bytes() == b"\x00\x01binary"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    files.atomic_write_text(path, "old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]


def test_a_write_that_raises_midway_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    files.atomic_write_text(path, "old")

    with pytest.raises(TypeError):
        files.atomic_write_bytes(path, object())  # not bytes: the write itself fails
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]


def test_text_must_be_a_string(tmp_path):
    with pytest.raises(TypeError, match="atomic_write_bytes"):
        files.atomic_write_text(tmp_path / "x", b"bytes")


def test_permissions_are_those_of_an_ordinary_file(tmp_path):
    reference = tmp_path / "reference"
    with open(reference, "wb"):
        pass
    path = tmp_path / "written"
    files.atomic_write_bytes(path, b"x")
    assert (path.stat().st_mode & 0o777) == (reference.stat().st_mode & 0o777)


def test_atomic_save_figure_writes_what_savefig_writes(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    direct = tmp_path / "direct.png"
    fig.savefig(direct, dpi=50)
    path = tmp_path / "plots" / "reliability.png"
    files.atomic_save_figure(fig, path, dpi=50)
    assert path.read_bytes() == direct.read_bytes()
    files.atomic_save_figure(fig, tmp_path / "figure", format="svg")
    assert b"<svg" in (tmp_path / "figure").read_bytes()
    with pytest.raises(ValueError, match="no suffix"):
        files.atomic_save_figure(fig, tmp_path / "figure2")

    def fail(*args, **kwargs):
        raise RuntimeError("renderer failed")

    fig.savefig = fail  # a drawing that fails keeps the previous image whole
    with pytest.raises(RuntimeError, match="renderer failed"):
        files.atomic_save_figure(fig, path, dpi=50)
    assert path.read_bytes() == direct.read_bytes()
    assert sorted(os.listdir(path.parent)) == ["reliability.png"]
    plt.close(fig)


def test_a_locked_directory_refuses_a_second_holder_and_names_the_first(tmp_path):
    """Two holders exclude each other (also within one process: each lock is its own open
    file); the refusal names the holder; the lock is free again after the block, also after
    an exception in it."""
    run = tmp_path / "new" / "run"
    with files.hold_directory_lock(run, "training"):  # creates the directory
        with pytest.raises(files.DirectoryInUseError,
                           match=rf"{run} is in use by another process \(pid {os.getpid()} on "
                                 r".*, training since .*\)\. Wait for it to finish, or stop it; "
                                 r"two processes training in one directory"):
            with files.hold_directory_lock(run, "training"):
                pass
    with pytest.raises(KeyError):
        with files.hold_directory_lock(run, "training"):
            raise KeyError("inside")
    with files.hold_directory_lock(run, "training"):
        pass
    assert (run / files.LOCK_FILE).exists()  # left in place: removing it would race


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    """The operating system releases the lock of a process killed with SIGKILL."""
    import signal
    import subprocess
    import sys
    import time
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from calib_jax import files\n"
         f"with files.hold_directory_lock({str(tmp_path)!r}, 'testing'):\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(files.DirectoryInUseError, match=rf"pid {holder.pid} on .*testing"):
            with files.hold_directory_lock(tmp_path, "testing"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    deadline = time.time() + 10
    while True:  # the kernel releases it as the process ends
        try:
            with files.hold_directory_lock(tmp_path, "testing"):
                break
        except files.DirectoryInUseError:
            assert time.time() < deadline, "the lock outlived its SIGKILLed holder"
            time.sleep(0.1)


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(RuntimeWarning, match=r"cannot lock .* \(No locks available\): two "
                                            r"processes using it at once would not be stopped"):
        with files.hold_directory_lock(tmp_path, "training"):
            ran = True
    assert ran


def test_lock_holder_names_the_holder_and_creates_nothing(tmp_path):
    assert files.lock_holder(tmp_path / "absent") is None
    assert not (tmp_path / "absent").exists()
    with files.hold_directory_lock(tmp_path, "training"):
        assert files.lock_holder(tmp_path).startswith(f"pid {os.getpid()} on ")
        assert "training since" in files.lock_holder(tmp_path)
    assert files.lock_holder(tmp_path) is None  # released; and probing did not take it
    with files.hold_directory_lock(tmp_path, "training"):
        pass


def test_a_lock_held_for_an_instant_does_not_refuse(tmp_path):
    """lock_holder's probe (another sweep listing its cells) holds the lock for an instant:
    a process taking the lock then waits a little instead of being refused."""
    import fcntl
    import threading
    with files.hold_directory_lock(tmp_path, "training"):
        pass
    probe = os.open(tmp_path / files.LOCK_FILE, os.O_RDWR)
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    threading.Timer(0.1, os.close, (probe,)).start()  # released 0.1 s later
    with files.hold_directory_lock(tmp_path, "training"):
        assert files.lock_holder(tmp_path).startswith(f"pid {os.getpid()} on ")


def test_a_file_is_no_directory_to_lock_or_write(tmp_path):
    (tmp_path / "a_file").write_text("kept")
    with pytest.raises(NotADirectoryError, match=r"`directory` = .*a_file is a file; give a "
                                                 r"directory to lock"):
        with files.hold_directory_lock(tmp_path / "a_file", "training"):
            pass
    assert files.unwritable_reason(tmp_path / "a_file") == "it is a file, not a directory"
    assert files.unwritable_reason(tmp_path / "a_file" / "run") == (
        f"{tmp_path / 'a_file'}, where it would be created, is a file, not a directory")
    assert (tmp_path / "a_file").read_text() == "kept"
