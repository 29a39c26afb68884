"""``lora-gui dataset check`` and ``lora-gui dataset prepare``.

Exit codes: 0 training can go ahead (warnings allowed) / the copies were written, 1 it
cannot / nothing could be written, 2 usage error. Progress goes to stderr, so ``--json``
output on stdout stays pure JSON. Heavy modules load inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_dataset_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``dataset check`` and ``dataset prepare``; each sets ``func`` (args -> exit code)."""
    dataset = subparsers.add_parser(
        "dataset", help="check a dataset folder, or write corrected copies of it",
        description="Check a dataset folder for problems, or write corrected copies of its images.",
    )
    dataset.set_defaults(func=partial(_no_action, dataset))
    actions = dataset.add_subparsers(dest="dataset_command", metavar="ACTION")

    check = actions.add_parser(
        "check", help="give every image and caption a verdict and say whether training can go ahead",
        description="Check every image and caption in DIR the way training would load them. Exit code 0: "
        "training can go ahead (warnings allowed); 1: it cannot; 2: usage error.",
    )
    check.add_argument("dir", help="the dataset folder")
    check.add_argument("--trigger", help="trigger word every caption should contain")
    _add_bucket_options(check)
    check.add_argument("--token-limit", type=_bounded(1, 100_000), default=77,
                       help="tokens the text encoder reads (default 77 for CLIP; 512 for Flux's T5)")
    check.add_argument("--json", action="store_true", help="print the report as one JSON object")
    check.add_argument("--write-report", nargs="?", const="", metavar="PATH",
                       help="also write the JSON report (default: DIR/dataset_report.json)")
    check.set_defaults(func=run_check)

    prepare = actions.add_parser(
        "prepare", help="write corrected copies (upright, RGB, bucket-sized) into another folder",
        description="Write corrected copies of the usable images in SRC to DST: EXIF orientation applied, "
        "RGB, resized and cropped to their bucket, captions as UTF-8. SRC is never modified.",
    )
    prepare.add_argument("src", help="the dataset folder to read")
    prepare.add_argument("dst", help="a folder outside SRC for the copies")
    _add_bucket_options(prepare)
    prepare.add_argument("--format", choices=("png", "jpg"), default="png", dest="image_format",
                         help="image format of the copies (default png; jpg is quality 95)")
    prepare.set_defaults(func=run_prepare)
    return dataset


def _add_bucket_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolution", type=_bounded(64, 4096), default=512,
                        help="training resolution (default 512)")
    parser.add_argument("--bucket-step", type=_bounded(8, 256), default=64,
                        help="bucket sides are multiples of this (default 64)")
    parser.add_argument("--size-multiple", type=_bounded(1, 256), default=8,
                        help="the model's size multiple: 8 for SD1.5/SDXL, 16 for Flux (default 8)")
    parser.add_argument("--caption-extension", default=".txt", help="caption file extension (default .txt)")


def build_parser() -> argparse.ArgumentParser:
    """A parser holding only the dataset commands (the main CLI adds them with ``add_dataset_commands``)."""
    parser = argparse.ArgumentParser(prog="lora-gui")
    add_dataset_commands(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not hasattr(args, "func"):
        print("error: name a command, e.g. `lora-gui dataset check DIR`.", file=sys.stderr)
        return EXIT_USAGE
    return args.func(args)


def run_check(args: argparse.Namespace) -> int:
    if not Path(args.dir).expanduser().is_dir():
        print(f"error: {args.dir} is not a folder; give the folder that holds your training images.",
              file=sys.stderr)
        return EXIT_USAGE
    from lora_gui.data.doctor import check_dataset

    with progress_bar("Checking images") as progress:
        report = check_dataset(
            Path(args.dir).expanduser(), trigger=args.trigger, resolution=args.resolution,
            caption_extension=args.caption_extension, token_limit=args.token_limit,
            bucket_step=args.bucket_step, size_multiple=args.size_multiple, progress=progress,
        )
    print(report.to_json() if args.json else report.render_text())
    if args.write_report is not None:
        try:
            path = report.write(args.write_report or None)
        except OSError as exc:
            print(f"error: could not write the report ({exc}); choose another path with --write-report PATH.",
                  file=sys.stderr)
            return EXIT_FAILED
        print(f"Wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK if report.ready else EXIT_FAILED


def run_prepare(args: argparse.Namespace) -> int:
    from lora_gui.data.doctor import check_dataset
    from lora_gui.data.prepare import PrepareError, check_folders, prepare_dataset

    try:
        source, _ = check_folders(args.src, args.dst)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    options = {"resolution": args.resolution, "bucket_step": args.bucket_step, "size_multiple": args.size_multiple}
    with progress_bar("Checking images") as progress:
        report = check_dataset(source, caption_extension=args.caption_extension, progress=progress, **options)
    with progress_bar("Writing copies") as progress:
        summary = prepare_dataset(
            source, args.dst, progress=progress, caption_extension=args.caption_extension,
            image_format=args.image_format, report=report, **options,
        )
    print(summary.describe())
    if not summary.written:
        print("error: no image could be written; run `lora-gui dataset check` on the source to see why.",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


@contextmanager
def progress_bar(label: str) -> Iterator:
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr (silent when not a terminal)."""
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=label, unit="file", file=sys.stderr, disable=None, leave=False)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def _no_action(parser: argparse.ArgumentParser, _args: argparse.Namespace) -> int:
    parser.print_usage(sys.stderr)
    print("error: name an action: `lora-gui dataset check DIR` or `lora-gui dataset prepare SRC DST`.",
          file=sys.stderr)
    return EXIT_USAGE


def _bounded(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse
