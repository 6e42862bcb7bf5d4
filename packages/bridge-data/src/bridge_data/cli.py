"""The ``bridge-data`` command line: ``bridge-data preprocess`` turns text corpora into indexed datasets."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys

from bridge_data.known_warnings import silence_known_warnings
from bridge_data.preprocessing import PreprocessConfig, preprocess
from bridge_data.tokenizers import TokenizerConfig

_EXAMPLE = """example:
  bridge-data preprocess --input corpus.jsonl --tokenizer /models/llama3 \\
      --text-key text --output-prefix data/corpus --workers 4
  prints "data/corpus.bin/.idx: N documents, N tokens"; use it as PretrainDataConfig(paths=["data/corpus"])
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bridge-data`` command."""
    parser = argparse.ArgumentParser(
        prog="bridge-data",
        description="Prepare training data for megatron-core: bridge-data preprocess tokenizes text corpora into "
        "the indexed datasets (.bin/.idx) that bridge-data's PretrainDataConfig and bridge-train read.",
        epilog="Run 'bridge-data preprocess --help' for its options.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{preprocess}")
    pre = commands.add_parser(
        "preprocess",
        help="tokenize JSONL / Parquet / HF datasets dirs into megatron-core .bin/.idx",
        description="Tokenize JSONL files, Parquet files or local HF datasets directories (save_to_disk) into "
        "megatron-core indexed datasets: one document per row, eod appended, written atomically. Existing "
        "outputs are kept unless --overwrite; an input is never overwritten.",
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pre.add_argument("--input", "-i", dest="inputs", action="append", required=True, metavar="PATH",
                     help="a .jsonl/.json file (also .gz/.bz2/.xz), a .parquet file or an HF datasets "
                          "directory; repeat to concatenate several")
    pre.add_argument("--output-prefix", "-o", required=True, metavar="PREFIX",
                     help="write PREFIX.bin and PREFIX.idx (PREFIX_KEY.* when several text keys are given)")
    pre.add_argument("--text-key", "--json-keys", dest="text_keys", nargs="+", action="extend", metavar="KEY",
                     help="row key(s) holding the text, each written to PREFIX_KEY.* when several are given "
                          "(repeatable; default: text)")
    tok = pre.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="DIR", help="local HF tokenizer directory")
    tok.add_argument("--null-vocab-size", type=int, metavar="N",
                     help="use the null tokenizer (texts are whitespace-separated ids < N)")
    pre.add_argument("--eod-token", default=None,
                     help="token ending each document, with --tokenizer (default: the eos token; the null "
                          "tokenizer's eod is N - 1)")
    pre.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                     help="append the eod id after each document (default: on)")
    pre.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=False,
                     help="put the bos id before each document (default: off)")
    pre.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    pre.add_argument("--chunk-size", type=int, default=256, help="rows per worker task (default: 256)")
    pre.add_argument("--split", default="train",
                     help="split of an HF DatasetDict directory (default: train); another is refused when no input "
                          "is one")
    pre.add_argument("--overwrite", action="store_true",
                     help="replace an existing PREFIX.bin/.idx (never an input); default: refuse")
    pre.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def _config(args) -> PreprocessConfig:
    if args.tokenizer is not None:
        tokenizer = TokenizerConfig(tokenizer_type="hf", path=args.tokenizer, eod_token=args.eod_token)
    else:
        tokenizer = TokenizerConfig(tokenizer_type="null", vocab_size=args.null_vocab_size)
    return PreprocessConfig(
        inputs=args.inputs, output_prefix=args.output_prefix, tokenizer=tokenizer, text_keys=args.text_keys,
        append_eod=args.append_eod, prepend_bos=args.prepend_bos, workers=args.workers,
        chunk_size=args.chunk_size, split=args.split, overwrite=args.overwrite, progress=args.progress,
    )


@contextlib.contextmanager
def _notices_on_stderr():
    """Print bridge-data's warnings (a stale temporary removed or kept) as one line each on stderr."""
    log = logging.getLogger("bridge_data")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("bridge-data preprocess: %(message)s"))
    handler.setLevel(logging.WARNING)
    log.addHandler(handler)
    propagate, log.propagate = log.propagate, False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _one_line(err: Exception) -> str:
    """An OS error as ``path: reason`` (not ``[Errno 13] ...``); anything else as its message."""
    if isinstance(err, OSError) and err.strerror and err.filename and type(err).__str__ is OSError.__str__:
        return f"{err.filename}: {err.strerror}"
    return str(err)


def main(argv: list[str] | None = None) -> int:
    """Run ``bridge-data``; returns the exit status (errors print one line to stderr and return 1).

    Args:
        argv: Arguments without the program name; None reads ``sys.argv``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.eod_token is not None and args.tokenizer is None:
        parser.error("--eod-token needs --tokenizer: the null tokenizer's eod is --null-vocab-size - 1")
    args.text_keys = args.text_keys or ["text"]
    silence_known_warnings()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a `kill` cleans up like Ctrl-C
    try:
        with _notices_on_stderr():
            results = preprocess(_config(args))
    except (ValueError, OSError) as err:
        print(f"bridge-data preprocess: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bridge-data preprocess: interrupted; no output written, temporary files removed", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    for r in results:
        print(f"{r.prefix}.bin/.idx: {r.num_documents} documents, {r.num_tokens} tokens"
              + (f", {r.skipped_empty} empty rows skipped" if r.skipped_empty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
