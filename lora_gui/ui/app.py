"""The Gradio app: five tabs over one AppSession. ``main(argv)`` parses the launch options."""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from lora_gui.ui.dataset_view import MAX_IMAGE_BYTES
from lora_gui.ui.login import LoginGuard, login_options
from lora_gui.ui.session import AppSession
from lora_gui.ui.workspace import NotAFolder, Workspace

TITLE = "LoRA GUI"
# The largest file any upload box takes (an image); each handler checks its own, smaller limits.
MAX_UPLOAD_BYTES = MAX_IMAGE_BYTES
CSS = """
.lg-status {font-family: ui-monospace, monospace; font-size: 0.9em}
.lg-small {font-size: 0.85em; opacity: 0.8}
.lg-error {border-left: 4px solid #d9534f; padding-left: 0.6em}
"""


def build_app(session: AppSession, notice: str | None = None):
    """The app; ``notice`` (Markdown) is shown under the title, e.g. the warning that no password is set."""
    import gradio as gr

    from lora_gui.ui.forms import family_labels
    from lora_gui.ui.light_routes import AppBlocks
    from lora_gui.ui.tabs import captions, config, dataset, test, train

    with AppBlocks(title=TITLE) as app:
        extras = "".join(f", extra datasets (read-only): `{shown_path(folder)}`"
                         for folder in session.workspace.extra_datasets)
        gr.Markdown(f"# {TITLE}\nTrain LoRA adapters for {family_labels()}. "
                    f"Workspace: `{shown_path(session.workspace.root)}`{extras}")
        if notice:
            gr.Markdown(notice, elem_id="launch-notice", elem_classes="lg-error")
        with gr.Tabs():
            with gr.Tab("Dataset", id="dataset") as dataset_panel:
                dataset_tab = dataset.build(session, dataset_panel)
            with gr.Tab("Captions", id="captions"):
                captions.build(session, dataset_tab)
            with gr.Tab("Config", id="config"):
                config_tab = config.build(session, dataset_tab.folder)
            with gr.Tab("Train", id="train"):
                app.light_routes += train.build(session, config_tab)
            with gr.Tab("Test", id="test"):
                test.build(session, config_tab)
        build_about()
    return app


def shown_path(path: Path) -> str:
    """A folder as the header shows it: under the home folder as ``~/...``."""
    try:
        return f"~/{path.relative_to(Path.home())}"
    except (ValueError, RuntimeError):
        return str(path)


def build_about() -> None:
    """The versions that ran, for bug reports: a footer line and a copyable list."""
    import gradio as gr

    from lora_gui.versions import version_report

    report = version_report()
    with gr.Accordion("About: versions (copy them into a bug report)", open=False, elem_id="about"):
        gr.Textbox("\n".join(report), lines=len(report), show_label=False, interactive=False,
                   buttons=["copy"], elem_id="about-versions")
    gr.Markdown(f"{report[0]} · {report[2]}", elem_classes="lg-small", elem_id="version-footer")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lora-gui gui", description="Start the LoRA GUI web app.")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--listen", action="store_true",
                        help="accept connections from other machines (binds 0.0.0.0; default 127.0.0.1 only)")
    parser.add_argument("--share", action="store_true",
                        help="open a temporary public link (always password-protected)")
    parser.add_argument("--auth", metavar="USER:PASS", help="require this user name and password")
    parser.add_argument("--workspace", default="workspace",
                        help="folder for datasets, outputs and caches (default ./workspace)")
    parser.add_argument("--datasets", action="append", default=[], metavar="DIR",
                        help="also offer the datasets in DIR, a folder outside the workspace (repeatable); the app "
                             "only reads it (captions there are not edited). Not offered through --share or "
                             "--listen unless --remote-datasets is given")
    parser.add_argument("--remote-datasets", action="store_true",
                        help="offer the --datasets folders to users coming through --share or --listen too")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    return parser.parse_args(argv)


def resolve_auth(args: argparse.Namespace) -> tuple[str, str] | None:
    """``--auth user:pass``; with ``--share`` and no ``--auth`` a password is generated."""
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise SystemExit("error: --auth expects USER:PASS, for example --auth me:a-long-password")
        return user, password
    if args.share:
        return "lora", secrets.token_urlsafe(12)
    return None


def open_access_warning(args: argparse.Namespace, auth: tuple[str, str] | None) -> str | None:
    """The warning for ``--listen`` without a password (Markdown), or None."""
    if not args.listen or auth is not None:
        return None
    return ("⚠ **No password is set, and the app accepts connections from other machines (--listen).** "
            f"Anyone who can reach this computer on port {args.port} can use it: see and change your datasets, "
            "captions and configs, and start training. To require a password, restart with "
            "`--auth user:pass`, for example `lora-gui --listen --auth me:a-long-password`.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    auth = resolve_auth(args)
    warning = open_access_warning(args, auth)
    if warning:
        print(warning.replace("**", "").replace("`", "'"), file=sys.stderr, flush=True)
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    if port_taken(host, args.port):  # said at once, before the app is built
        print(port_taken_message(args.port), file=sys.stderr)
        return 1
    extras, held_back = offered_datasets(args)
    if held_back:
        print(held_back, file=sys.stderr, flush=True)
    try:
        workspace = Workspace.create(Path(args.workspace), tuple(extras))
    except NotAFolder as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    session = AppSession(workspace=workspace)
    app = build_app(session, notice=warning)
    if args.share and not args.auth:
        print(f"Share link protection: user '{auth[0]}', password '{auth[1]}'", flush=True)

    app.queue(default_concurrency_limit=4)
    try:
        launch(app, args, auth, workspace)
    except OSError as exc:
        if "port" not in str(exc).lower():
            raise
        print(port_taken_message(args.port), file=sys.stderr)
        return 1
    return 0


def offered_datasets(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """The --datasets folders the app may offer, and a note when they are held back from a network launch."""
    remote = args.share or args.listen
    if not args.datasets or not remote or args.remote_datasets:
        return list(args.datasets), None
    how = "--share" if args.share else "--listen"
    return [], (f"note: the --datasets folders are not offered, because the app is reachable from other machines "
                f"({how}). To offer them to everyone who can open the app, add --remote-datasets.")


def port_taken(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def port_taken_message(port: int) -> str:
    return (f"error: port {port} is in use (is the app already running? then open http://127.0.0.1:{port}). "
            f"To start another one, pick a free port: lora-gui --port {port + 1}")


def launch(app, args: argparse.Namespace, auth: tuple[str, str] | None, workspace: Workspace) -> None:
    import gradio as gr

    app.launch(
        server_name="0.0.0.0" if args.listen else "127.0.0.1",
        server_port=args.port,
        share=args.share,
        allowed_paths=workspace.allowed_paths(),
        inbrowser=not args.no_browser,
        theme=gr.themes.Soft(),
        css=CSS,
        footer_links=["settings"],
        max_file_size=MAX_UPLOAD_BYTES,
        **login_options(LoginGuard(*auth) if auth else None),
    )
