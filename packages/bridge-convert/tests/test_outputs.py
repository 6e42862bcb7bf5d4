"""Safe outputs: what is refused, what survives a refusal or a failure, and what a killed run leaves behind."""

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from bridge_convert.outputs import OutputError, check_output_dir, staged_output_dir


def _user_files(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "important.txt").write_text("keep me")
    (path / "sub").mkdir()
    (path / "sub" / "notes.md").write_text("and me")


def _assert_user_files(path):
    assert (path / "important.txt").read_text() == "keep me"
    assert (path / "sub" / "notes.md").read_text() == "and me"


def test_non_empty_output_is_refused_and_its_files_survive(tmp_path):
    out = tmp_path / "out"
    _user_files(out)
    refused = r"out is not empty \(2 entries: important.txt, sub\); pass --overwrite"
    with pytest.raises(OutputError, match=refused), staged_output_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
    _assert_user_files(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_only_once_the_new_output_is_complete(tmp_path):
    out = tmp_path / "out"
    _user_files(out)
    with pytest.raises(RuntimeError), staged_output_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("2")
        raise RuntimeError("conversion failed")
    _assert_user_files(out)
    with staged_output_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("2")
        _assert_user_files(out)  # the old output is still in place while the new one is written
    assert [p.name for p in out.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_existing_output_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    with staged_output_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    assert (tmp_path / "out" / "a").read_text() == "1"


def test_interrupt_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), staged_output_dir(tmp_path / "out") as tmp:
        (tmp / "half").write_bytes(b"x" * 100)
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("relation", ["same", "inside", "contains", "symlink"])
def test_output_related_to_an_input_is_refused_even_with_overwrite(tmp_path, relation):
    source = tmp_path / "models" / "llama"
    _user_files(source)
    out = {"same": source, "inside": source / "megatron", "contains": tmp_path / "models",
           "symlink": tmp_path / "link"}[relation]
    if relation == "symlink":
        out.symlink_to(source)
    with pytest.raises(OutputError, match="the input .*--overwrite does not allow this"):
        check_output_dir(out, overwrite=True, inputs=[source])
    _assert_user_files(source)


def test_training_checkpoint_is_never_a_conversion_output(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000100").mkdir(parents=True)
    with pytest.raises(OutputError, match="holds a Megatron training checkpoint"):
        check_output_dir(ckpt, overwrite=True)
    (ckpt / "iter_0000100").rmdir()
    (ckpt / "latest_checkpointed_iteration.txt").write_text("100\n")
    with pytest.raises(OutputError, match="holds a Megatron training checkpoint"):
        check_output_dir(ckpt, overwrite=True)


def test_a_previous_conversion_output_may_be_overwritten(tmp_path):
    out = tmp_path / "mcore"
    (out / "iter_0000000").mkdir(parents=True)
    (out / "iter_0000000" / "bridge.json").write_text('{"converted_by": "bridge-convert import"}')
    (out / "latest_checkpointed_iteration.txt").write_text("0\n")
    with pytest.raises(OutputError, match="not empty"):
        check_output_dir(out)
    check_output_dir(out, overwrite=True)


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match="exists and is a file"):
        check_output_dir(tmp_path / "out", overwrite=True)


def test_output_below_a_file_is_refused(tmp_path):
    (tmp_path / "file.py").write_text("x")
    with pytest.raises(OutputError, match=r"cannot be made: .*file.py is a file, not a directory"):
        check_output_dir(tmp_path / "file.py" / "sub" / "out")


def test_read_only_parent_is_one_line(tmp_path):
    if os.geteuid() == 0:  # root writes through permissions; /proc/sys refuses writes to everyone
        parent = "/proc/sys"
        if os.access(parent, os.W_OK):
            pytest.skip("no read-only directory available to root here")
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
    try:
        refused = r"cannot write into .*: permission denied or read-only"
        with pytest.raises(OutputError, match=refused), staged_output_dir(f"{parent}/out"):
            pass
    finally:
        if os.geteuid() != 0:
            parent.chmod(0o755)


def test_full_disk_names_the_path_and_the_bytes(tmp_path):
    too_big = r"not enough space for .*out: it needs 1024.0 TiB"
    with pytest.raises(OutputError, match=too_big), staged_output_dir(tmp_path / "out", needed_bytes=2**50):
        pass
    full = r"no space left on the device of .*out; it needs 1.0 KiB"
    with pytest.raises(OutputError, match=full), staged_output_dir(tmp_path / "out", needed_bytes=1024) as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))
    assert list(tmp_path.iterdir()) == []


def test_output_directory_respects_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with staged_output_dir(tmp_path / "out") as tmp:
            assert (tmp.stat().st_mode & 0o777) == 0o755
        assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(previous)


_WRITER = textwrap.dedent("""
    import sys, time
    from bridge_convert.outputs import staged_output_dir
    with staged_output_dir(sys.argv[1]) as tmp:
        (tmp / "config.json").write_text("{}")
        with open(tmp / "model.safetensors", "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
""")


def test_killed_run_leaves_nothing_complete_and_the_next_run_cleans_up(tmp_path, caplog):
    out = tmp_path / "hf"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not out.exists()
    (stale,) = tmp_path.iterdir()
    assert stale.name.startswith(".hf.tmp-") and (stale / "model.safetensors").exists()
    with caplog.at_level(logging.WARNING, logger="bridge.outputs"), staged_output_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    assert [r.getMessage() for r in caplog.records] == [f"removing {stale} left by an interrupted run (4.0 KiB)"]


def test_a_running_conversion_into_the_same_place_is_left_alone(tmp_path):
    out = tmp_path / "hf"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        with staged_output_dir(tmp_path / "hf") as tmp:
            (tmp / "a").write_text("1")
        (running,) = [p for p in tmp_path.iterdir() if p.name != "hf"]
        assert running.name.startswith(".hf.tmp-")
    finally:
        proc.kill()
        proc.wait(timeout=30)
