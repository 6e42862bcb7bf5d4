from importlib.metadata import entry_points

import pytest

from bridge_data.cli import main


def test_console_script_points_at_main():
    [script] = [e for e in entry_points(group="console_scripts") if e.name == "bridge-data"]
    assert script.value == "bridge_data.cli:main"


def test_preprocess_help_lists_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["preprocess", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--input", "--output-prefix", "--text-key", "--json-keys", "--tokenizer", "--workers",
                   "--append-eod", "example:"):
        assert option in out


def test_preprocess_writes_indexed_dataset(tokenizer, tokenizer_dir, corpus_jsonl, tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path, texts = corpus_jsonl(5, key="body")
    prefix = str(tmp_path / "out")
    assert main(["preprocess", "-i", path, "-o", prefix, "--tokenizer", tokenizer_dir, "--json-keys", "body",
                 "--no-progress"]) == 0
    assert f"{prefix}.bin/.idx: 5 documents" in capsys.readouterr().out
    ds = IndexedDataset(prefix)
    assert ds[4].tolist() == tokenizer.tokenize(texts[4]) + [tokenizer.eod]


def test_preprocess_error_is_one_line_with_status_1(tokenizer_dir, tmp_path, capsys):
    missing = str(tmp_path / "absent.jsonl")
    assert main(["preprocess", "-i", missing, "-o", str(tmp_path / "x"), "--tokenizer", tokenizer_dir]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bridge-data preprocess: error:") and "absent.jsonl" in err


def test_preprocess_requires_a_tokenizer(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["preprocess", "-i", "x.jsonl", "-o", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_description_is_a_sentence_and_every_option_has_help():
    import argparse

    from bridge_data.cli import build_parser

    parser = build_parser()
    assert parser.description.startswith("Prepare training data") and parser.description.endswith(".")
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_a_tokenizer_dir_without_tokenizer_files_is_one_line(tmp_path, write_jsonl, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    (tmp_path / "model").mkdir()
    assert main(["preprocess", "-i", src, "-o", str(tmp_path / "c"), "--tokenizer", str(tmp_path / "model")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no tokenizer files (looked for tokenizer.json" in err
