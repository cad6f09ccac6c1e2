"""``joule-data``: make and check the trainer's prepared datasets (see ``dataset``).

    joule-data prepare INPUT... --out DIR [--shard-tokens N] [--tokenizer chars|bytes] [--force]
    joule-data verify DIR
    joule-data stage (--s3 BUCKET/PREFIX --endpoint URL [--region R] | --https URL | --dir PATH)
                     --into DIR [--ca-bundle FILE] [--trust-existing]
                     [--termination-log PATH] [--metrics-port N]

``prepare`` reads text files and folders (their ``*.txt``, all depths), tokenizes them with
the trainer's tokenizer and writes shards and ``manifest.json`` to DIR; progress goes to
stderr every 2 s, and one summary line to stdout at the end. ``verify`` checks every shard's
size and sha256 against the manifest. Errors: one line on stderr, exit code 65 (EX_DATAERR)
for input or a dataset that is not right, 2 for wrong flags. ``stage`` copies a prepared
dataset into a cache folder, resumably, verifying every file; its exit codes and result are
described in ``stage``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from joule_trainer import dataset, stage


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class Progress:
    """Progress lines on stderr, at most one every ``every`` seconds."""

    def __init__(self, every: float = 2.0) -> None:
        self.every = every
        self.began = self.last = time.monotonic()
        self.phase = ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if phase != self.phase:  # each pass measures its own rate
            self.phase, self.began = phase, now
        if now - self.last < self.every:
            return
        self.last = now
        pct = 100 * done / total if total else 100.0
        rate = done / max(now - self.began, 1e-9) / 1e6
        print(
            f"joule-data: {phase} {_mib(done)} of {_mib(total)} ({pct:.0f}%), {rate:.1f} MB/s",
            file=sys.stderr,
            flush=True,
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="joule-data", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize text into shards and a manifest")
    prep.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="file or folder")
    prep.add_argument("--out", type=Path, required=True, metavar="DIR")
    prep.add_argument(
        "--shard-tokens",
        type=int,
        default=dataset.DEFAULT_SHARD_TOKENS,
        metavar="N",
        help=f"tokens per shard (default {dataset.DEFAULT_SHARD_TOKENS})",
    )
    prep.add_argument(
        "--tokenizer",
        choices=dataset.TOKENIZERS,
        default="chars",
        help="chars: one token per character, as the trainer's --corpus (default); "
        "bytes: one per byte, vocabulary 256",
    )
    prep.add_argument(
        "--force", action="store_true", help="replace a dataset in a folder that is not empty"
    )
    ver = sub.add_parser("verify", help="check every shard against the manifest")
    ver.add_argument("directory", type=Path, metavar="DIR")
    stg = sub.add_parser(
        "stage", help="copy a prepared dataset into a cache folder, verifying every file"
    )
    stage.add_arguments(stg)
    args = p.parse_args(argv)
    if args.command == "prepare" and args.shard_tokens < 1:
        p.error("--shard-tokens must be >= 1")
    if args.command == "stage":
        stage.check_arguments(args, stg.error)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "stage":
        return stage.run(args)
    try:
        if args.command == "prepare":
            done = dataset.prepare(
                args.inputs,
                args.out,
                tokenizer=args.tokenizer,
                shard_tokens=args.shard_tokens,
                force=args.force,
                progress=Progress(),
            )
            m = done.manifest
            size = sum(s["bytes"] for s in m["shards"])
            rate = done.input_bytes / max(done.seconds, 1e-9) / 1e6
            print(
                f"joule-data: prepared {args.out}: {m['total_tokens']} tokens in "
                f"{len(m['shards'])} shards ({_mib(size)}) from {len(done.files)} files "
                f"({_mib(done.input_bytes)}), tokenizer {m['tokenizer']['name']} "
                f"(vocabulary {m['tokenizer']['vocab_size']}), {done.seconds:.1f} s "
                f"({rate:.1f} MB/s); dataset version {m['version']}",
                flush=True,
            )
        else:
            m = dataset.verify(args.directory)
            print(
                f"joule-data: {args.directory}: {len(m['shards'])} shards, "
                f"{m['total_tokens']} tokens, every sha256 as the manifest says; "
                f"dataset version {m['version']}",
                flush=True,
            )
    except dataset.DataError as exc:
        print(f"joule-data: {exc}", file=sys.stderr, flush=True)
        return dataset.EXIT_DATA
    return 0


if __name__ == "__main__":
    sys.exit(main())
