"""Starting the web app from `lora-gui`, `python app.py` or the launch scripts."""

from __future__ import annotations

import sys


def launch_app(argv: list[str]) -> int:
    from lora_gui.quiet import quiet_expected_noise

    quiet_expected_noise()
    try:
        from lora_gui.ui.app import main as ui_main
    except ModuleNotFoundError as exc:
        if not exc.name or not exc.name.startswith("lora_gui.ui"):
            raise
        print(
            "The web app is not part of this version yet. The training engine works from the command line:\n"
            "  lora-gui init-config my-lora.toml --preset sd15-cpu-demo\n"
            "  lora-gui train my-lora.toml\n"
            "Run `lora-gui --help` for every command.",
            file=sys.stderr,
        )
        from lora_gui.cli import build_parser

        build_parser().print_help()
        return 0
    return ui_main(argv)
