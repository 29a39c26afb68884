"""``lora-gui caption DIR --captioner NAME``: write caption files with a captioning model."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# Options that only some captioners take: flag -> (captioner option, captioners that take it).
_SPECIFIC = {
    "threshold": ("threshold", ("wd14",)),
    "character_threshold": ("character_threshold", ("wd14",)),
    "include_rating": ("include_rating", ("wd14",)),
    "template": ("template", ("template",)),
}


def add_caption_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "caption", help="write caption files with a captioning model",
        description="Caption every image in DIR. By default images that already have a caption file are left "
                    "alone, so running again continues where an interrupted run stopped.")
    parser.add_argument("dir", nargs="?", help="dataset folder")
    parser.add_argument("--captioner", help="blip, blip-large, florence2, florence2-large, wd14 or template "
                                            "(see --list)")
    parser.add_argument("--list", action="store_true", help="list the captioners and exit")
    parser.add_argument("--model", help="Hugging Face id or local folder (default: the captioner's own model)")
    parser.add_argument("--trigger", default="", help="trigger word put first in every caption (never twice)")
    parser.add_argument("--prefix", default="", help="text put before each caption")
    parser.add_argument("--suffix", default="", help="text put after each caption")
    parser.add_argument("--max-length", type=int, default=0, metavar="N",
                        help="most characters per caption, cut at a tag or word (default: no limit)")
    parser.add_argument("--threshold", type=float, help="wd14: confidence needed for a general tag (0.35)")
    parser.add_argument("--character-threshold", type=float, help="wd14: confidence for a character tag (0.85)")
    parser.add_argument("--include-rating", action="store_true", help="wd14: add the rating tag (general, ...)")
    parser.add_argument("--template", help="template: caption text with {trigger}, {filename}, {folder}")
    parser.add_argument("--batch-size", type=int, default=0, metavar="N", help="images per batch (default: "
                                                                                "the captioner's own)")
    parser.add_argument("--device", default="auto", help="auto (GPU if there is one), cuda, cuda:N, mps or cpu")
    parser.add_argument("--caption-extension", default=".txt", help="caption file extension (default .txt)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--skip-existing", dest="mode", action="store_const", const="skip_existing",
                       help="leave images that have a caption file alone (the default)")
    modes.add_argument("--only-empty", dest="mode", action="store_const", const="only_empty",
                       help="caption images whose caption file is missing or empty")
    modes.add_argument("--overwrite", dest="mode", action="store_const", const="overwrite",
                       help="replace every caption")
    parser.set_defaults(func=run_caption, mode="skip_existing")
    return parser


def run_caption(args: argparse.Namespace) -> int:
    from lora_gui.captioning import CaptionerError

    if args.list:
        return _print_captioners()
    try:
        captioner, options = _build(args)
    except CaptionerError as exc:
        return _fail(str(exc), EXIT_USAGE)
    return _caption(args.dir, captioner, options)


def _build(args: argparse.Namespace):
    from lora_gui.captioning import CaptionerError, CaptionOptions, captioner_names, get_captioner

    if not args.dir:
        raise CaptionerError("Give the dataset folder: lora-gui caption DIR --captioner NAME")
    if not Path(args.dir).expanduser().is_dir():
        raise CaptionerError(f"{args.dir} is not a folder: give the folder that holds your training images.")
    if not args.captioner:
        raise CaptionerError(f"Choose a captioner with --captioner NAME: {', '.join(captioner_names())} "
                             "(lora-gui caption --list describes them).")
    name = args.captioner.strip().lower()
    extra = {}
    for flag, (option, takers) in _SPECIFIC.items():
        value = getattr(args, flag)
        if value is None or value is False:
            continue
        if name not in takers:
            raise CaptionerError(f"--{flag.replace('_', '-')} only applies to the {' and '.join(takers)} captioner.")
        extra[option] = value
    if name == "template":
        extra["trigger"] = args.trigger
    captioner = get_captioner(name, model=args.model, **extra)
    options = CaptionOptions(trigger=args.trigger, prefix=args.prefix, suffix=args.suffix,
                             max_length=args.max_length, mode=args.mode, batch_size=args.batch_size,
                             caption_extension=args.caption_extension, device=args.device)
    return captioner, options


def _caption(folder: str, captioner, options) -> int:
    from lora_gui.captioning import CaptionerError, caption_dataset

    printer = _Printer()
    stop = _StopOnInterrupt(printer)
    try:
        summary = caption_dataset(folder, captioner, options, printer.handle, stop.requested)
    except CaptionerError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail("Stopped. Captions already written are kept; run the same command again to continue.",
                     EXIT_FAILED)
    finally:
        printer.close()
        stop.restore()
    for image, reason in summary.failed:
        print(f"warning: {image}: {reason}", file=sys.stderr)
    print(summary.describe())
    if summary.failed:
        print("Fix or remove the images listed above, then run the same command again to caption them.",
              file=sys.stderr)
    return EXIT_FAILED if summary.failed or summary.stopped else EXIT_OK


def _print_captioners() -> int:
    from lora_gui.captioning import list_captioners

    for info in list_captioners():
        print(f"{info.name:16s} {info.label}")
        if info.default_model:
            print(f"{'':16s} default model: {info.default_model}")
    return EXIT_OK


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


class _Printer:
    """A progress bar for captioned images, and one line per status message (downloads at most every 2 s)."""

    def __init__(self) -> None:
        self._bar = None
        self._last_text = ""
        self._last_time = 0.0

    def handle(self, event) -> None:
        from lora_gui.captioning import CaptionProgress
        from lora_gui.events import Status

        if isinstance(event, CaptionProgress):
            self._progress(event)
        elif isinstance(event, Status):
            self._status(event)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def _progress(self, event) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=event.total, desc="Captioning", unit="image", dynamic_ncols=True, file=sys.stderr)
        self._bar.update(event.done - self._bar.n)

    def _status(self, event) -> None:
        now = time.monotonic()
        counting = event.total is not None and event.current != event.total
        if event.text == self._last_text or (counting and now - self._last_time < 2.0):
            return
        self._last_text, self._last_time = event.text, now
        self.message(event.text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _StopOnInterrupt:
    """The first Ctrl-C finishes the current batch and stops; a second one stops at once."""

    def __init__(self, printer: _Printer) -> None:
        self._printer = printer
        self._stop = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, _signum, _frame) -> None:
        if self._stop:
            raise KeyboardInterrupt
        self._stop = True
        self._printer.message("Stopping after this batch (press Ctrl-C again to stop at once)...")

    def requested(self) -> bool:
        return self._stop

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
