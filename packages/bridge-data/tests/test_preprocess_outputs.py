"""What ``bridge-data preprocess`` may and may not touch: existing outputs, inputs, temporaries of killed runs,
file modes, read-only and full disks. Every failure is one line on stderr and exit status 1."""

import errno
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from bridge_data.cli import main
from bridge_data.indexed_writer import IndexedWriter, remove_stale_temporaries


def _run(capsys, *argv):
    capsys.readouterr()  # only what this run prints
    rc = main(["preprocess", *argv, "--no-progress"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _ids_jsonl(path, n=20):
    path.write_text("".join(f'{{"text": "{i % 90} {(i * 7) % 90} 3"}}\n' for i in range(n)))
    return str(path)


def test_an_output_inside_an_input_directory_is_refused_even_with_overwrite(tmp_path, capsys):
    from datasets import Dataset

    Dataset.from_dict({"text": ["1 2", "3 4"]}).save_to_disk(str(tmp_path / "hf"))
    before = sorted(os.listdir(tmp_path / "hf"))
    rc, _, err = _run(capsys, "-i", str(tmp_path / "hf"), "-o", str(tmp_path / "hf" / "c"), "--null-vocab-size",
                      "10", "--overwrite")
    assert rc == 1 and err.count("\n") == 1
    assert "is the input" in err and str(tmp_path / "hf" / "c.bin") in err
    assert sorted(os.listdir(tmp_path / "hf")) == before


def test_an_output_that_links_to_an_input_is_refused_even_with_overwrite(tmp_path, capsys):
    src = _ids_jsonl(tmp_path / "in.jsonl")
    os.symlink(src, tmp_path / "c.bin")
    content = (tmp_path / "in.jsonl").read_text()
    rc, _, err = _run(capsys, "-i", src, "-o", str(tmp_path / "c"), "--null-vocab-size", "100", "--overwrite")
    assert rc == 1 and "is the input" in err
    assert (tmp_path / "in.jsonl").read_text() == content


def test_an_existing_output_is_refused_and_kept(tmp_path, capsys):
    src = _ids_jsonl(tmp_path / "in.jsonl")
    (tmp_path / "c.idx").write_text("someone's file")
    rc, _, err = _run(capsys, "-i", src, "-o", str(tmp_path / "c"), "--null-vocab-size", "100")
    assert rc == 1 and err.count("\n") == 1 and "--overwrite" in err and str(tmp_path / "c.idx") in err
    assert (tmp_path / "c.idx").read_text() == "someone's file" and not (tmp_path / "c.bin").exists()
    (tmp_path / "c.bin").mkdir()  # not a file: refused even with --overwrite
    rc, _, err = _run(capsys, "-i", src, "-o", str(tmp_path / "c"), "--null-vocab-size", "100", "--overwrite")
    assert rc == 1 and "is not a file" in err


def test_outputs_respect_the_umask(tmp_path, capsys):
    src = _ids_jsonl(tmp_path / "in.jsonl")
    old = os.umask(0o027)
    try:
        assert _run(capsys, "-i", src, "-o", str(tmp_path / "c"), "--null-vocab-size", "100")[0] == 0
    finally:
        os.umask(old)
    for ext in (".bin", ".idx"):
        assert stat.S_IMODE((tmp_path / f"c{ext}").stat().st_mode) == 0o640, ext


def test_stale_temporaries_of_this_prefix_are_removed_and_nothing_else(tmp_path, capsys):
    src = _ids_jsonl(tmp_path / "in.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    stale = [".c.ab12cd34.bin.tmp", ".c.ab12cd34.idx.tmp", ".c.zz_9yy8x.bin.tmp"]  # tempfile's names too
    others = [".c.bin.tmp", "c.bin.tmp", ".cc.ab12cd34.bin.tmp", ".c.ab12cd3.bin.tmp", "notes.txt"]
    for name in stale + others:
        (out / name).write_bytes(b"x" * 10)
    rc, _, err = _run(capsys, "-i", src, "-o", str(out / "c"), "--null-vocab-size", "100")
    assert rc == 0
    assert sorted(os.listdir(out)) == sorted(["c.bin", "c.idx", *others])
    for name in stale:
        assert f"removed {out / name} (10 bytes), left by an interrupted bridge-data preprocess run" in err


def test_a_live_writers_temporaries_are_kept(tmp_path, caplog):
    import numpy as np

    writer = IndexedWriter(str(tmp_path / "c"), np.uint16)
    try:
        [tmp] = os.listdir(tmp_path)
        assert remove_stale_temporaries(str(tmp_path / "c")) == []
        assert os.listdir(tmp_path) == [tmp] and "another bridge-data preprocess is writing it" in caplog.text
    finally:
        writer.discard()
    assert os.listdir(tmp_path) == []


def test_a_sigkilled_run_leaves_a_temporary_that_the_next_run_removes(tmp_path, capsys):
    out = tmp_path / "out"
    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)  # the child blocks on it mid-run, so the kill lands while its .bin.tmp is open
    child = subprocess.Popen([sys.executable, "-m", "bridge_data.cli", "preprocess", "-i", str(fifo), "-o",
                              str(out / "c"), "--null-vocab-size", "100", "--no-progress", "--chunk-size", "64"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (out.exists() and any(n.endswith(".bin.tmp") for n in os.listdir(out))):
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the child never created its temporary"
            time.sleep(0.2)
        with open(fifo, "w") as stream:  # keep it open: the child never sees the end of its input
            stream.write('{"text": "1 2 3 4 5 6 7 8"}\n' * 5000)
            stream.flush()
            [tmp] = [out / n for n in os.listdir(out) if n.endswith(".bin.tmp")]
            while tmp.stat().st_size == 0:  # documents reached the file: killed mid-write
                assert time.monotonic() < deadline
                time.sleep(0.1)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    assert tmp.exists() and not (out / "c.bin").exists()
    rc, _, err = _run(capsys, "-i", _ids_jsonl(tmp_path / "in.jsonl"), "-o", str(out / "c"), "--null-vocab-size",
                      "100")
    assert rc == 0 and f"removed {tmp}" in err
    assert sorted(os.listdir(out)) == ["c.bin", "c.idx"]


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory this process cannot create files in (as root, chmod does not stop it: sysfs does)."""
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    for candidate in (str(locked), "/sys/fs"):
        try:
            with open(os.path.join(candidate, ".bridge-data-probe"), "w"):
                pass
            os.unlink(os.path.join(candidate, ".bridge-data-probe"))
        except OSError:
            yield candidate
            break
    else:
        pytest.skip("no directory here refuses writes")
    locked.chmod(0o755)


def test_a_read_only_output_directory_is_one_line(tmp_path, unwritable_dir, capsys):
    src = _ids_jsonl(tmp_path / "in.jsonl")
    rc, _, err = _run(capsys, "-i", src, "-o", os.path.join(unwritable_dir, "c"), "--null-vocab-size", "100")
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith(f"bridge-data preprocess: error: cannot write {unwritable_dir}:")


def test_a_full_disk_is_one_line_naming_the_file_and_the_bytes(tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    pq.write_table(pa.table({"text": [f"{i % 90} 1 2" for i in range(40)]}), str(tmp_path / "in.parquet"))
    original = IndexedDatasetBuilder.add_document

    def add_document(self, *args, **kwargs):  # the disk fills after 10 documents, as write(2) reports it
        if len(self.sequence_lengths) >= 10:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", add_document)
    (tmp_path / "out").mkdir()
    rc, _, err = _run(capsys, "-i", str(tmp_path / "in.parquet"), "-o", str(tmp_path / "out" / "c"),
                      "--null-vocab-size", "100", "--chunk-size", "4")
    assert rc == 1 and err.count("\n") == 1, err
    assert "no space left writing " + str(tmp_path / "out" / ".c.") in err
    assert "after 80 bytes" in err and "about 240 more bytes needed for the remaining 30 documents" in err
    assert os.listdir(tmp_path / "out") == []


def test_a_text_the_tokenizer_refuses_names_its_row(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "1 2 3"}\n{"text": "4 5"}\n{"text": "6 hello"}\n')
    rc, _, err = _run(capsys, "-i", str(src), "-o", str(tmp_path / "c"), "--null-vocab-size", "100")
    assert rc == 1 and f"{src}:3: key 'text': NullTokenizer reads whitespace-separated ids, got 'hello'" in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def _two_keys_jsonl(path, n=20):
    path.write_text("".join(f'{{"a": "{i % 90} 1", "b": "{(i * 7) % 90} 2 3"}}\n' for i in range(n)))
    return str(path)


def test_a_run_that_fails_finishing_its_second_output_leaves_neither(tmp_path, capsys, monkeypatch):
    """Each key's pair was renamed into place as soon as it was finished: a full disk at the second key's index
    left the first key's complete pair (and, with --overwrite, beside the other key's old one)."""
    src = _two_keys_jsonl(tmp_path / "in.jsonl")
    real = IndexedWriter.finish

    def finish(self):
        if self.prefix.endswith("_b"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self)

    monkeypatch.setattr(IndexedWriter, "finish", finish)
    (tmp_path / "out").mkdir()
    rc, _, err = _run(capsys, "-i", src, "-o", str(tmp_path / "out" / "c"), "--text-key", "a", "b",
                      "--null-vocab-size", "100")
    assert rc == 1 and err.count("\n") == 1, err
    assert os.listdir(tmp_path / "out") == []


def test_an_output_another_run_put_in_place_meanwhile_is_not_replaced(tmp_path, capsys, monkeypatch):
    """The existence check ran at the start only: the run that finished second replaced the other's output."""
    src = _two_keys_jsonl(tmp_path / "in.jsonl")
    real = IndexedWriter.finish

    def finish(self):  # another run, into the same prefix, puts its b pair in place while this one writes
        if self.prefix.endswith("_b"):
            for ext in (".bin", ".idx"):
                (tmp_path / f"c_b{ext}").write_text("the other run's")
        return real(self)

    monkeypatch.setattr(IndexedWriter, "finish", finish)
    rc, _, err = _run(capsys, "-i", src, "-o", str(tmp_path / "c"), "--text-key", "a", "b", "--null-vocab-size", "100")
    assert rc == 1 and f"output {tmp_path / 'c_b.bin'} appeared while this run was writing" in err
    assert sorted(os.listdir(tmp_path)) == ["c_b.bin", "c_b.idx", "in.jsonl"]  # a's pair taken back, no temporaries
    assert (tmp_path / "c_b.bin").read_text() == (tmp_path / "c_b.idx").read_text() == "the other run's"


def test_a_failed_run_removes_the_output_directories_it_made(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    rc, _, err = _run(capsys, "-i", str(bad), "-o", str(tmp_path / "new" / "deep" / "c"), "--null-vocab-size", "100")
    assert rc == 1 and "NullTokenizer reads whitespace-separated ids" in err
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]
    (tmp_path / "afile").write_text("")
    rc, _, err = _run(capsys, "-i", str(bad), "-o", str(tmp_path / "afile" / "sub" / "c"), "--null-vocab-size", "100")
    assert rc == 1 and (f"cannot create the output directory {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a "
                        "file, not a directory") in err  # was "afile: File exists"


def test_repeated_text_keys_are_all_written(tmp_path, capsys):
    """--text-key a --text-key b wrote only b, to PREFIX (the last flag won)."""
    src = _two_keys_jsonl(tmp_path / "in.jsonl")
    rc, out, _ = _run(capsys, "-i", src, "-o", str(tmp_path / "c"), "--text-key", "a", "--text-key", "b",
                      "--null-vocab-size", "100")
    assert rc == 0 and sorted(p for p in os.listdir(tmp_path) if p.startswith("c")) == [
        "c_a.bin", "c_a.idx", "c_b.bin", "c_b.idx"]


def test_eod_token_with_the_null_tokenizer_is_a_usage_error(tmp_path, capsys):
    """It was accepted and ignored (the eod stayed N - 1)."""
    with pytest.raises(SystemExit) as info:
        main(["preprocess", "-i", _ids_jsonl(tmp_path / "in.jsonl"), "-o", str(tmp_path / "c"),
              "--null-vocab-size", "100", "--eod-token", "5"])
    assert info.value.code == 2 and "--eod-token needs --tokenizer" in capsys.readouterr().err


def test_eod_token_without_appending_an_eod_is_a_usage_error(tmp_path, capsys, tokenizer_dir):
    """It was accepted and ignored (no eod is written)."""
    assert main(["preprocess", "-i", _ids_jsonl(tmp_path / "in.jsonl"), "-o", str(tmp_path / "c"),
                 "--tokenizer", tokenizer_dir, "--eod-token", "</s>", "--no-append-eod"]) == 1
    assert "append_eod is False (--no-append-eod) appends none; drop one" in capsys.readouterr().err
    assert not list(tmp_path.glob("c*"))
