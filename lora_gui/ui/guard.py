"""Handlers never show a traceback: expected problems and bugs alike become a message in the tab."""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("lora_gui.ui")


def message_guard(message, expected: tuple[type[Exception], ...], advice: str, symbol: str = "⚠"):
    """Decorator factory: exceptions of ``expected`` types show their text in ``message``; any other
    exception is logged and shown with ``advice``. Nothing else on the page changes."""

    def wrap(handler):
        @functools.wraps(handler)  # keeps the signature: gradio finds gr.Progress and SelectData through it
        def guarded(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except expected as exc:
                return {message: f"{symbol} {exc}"}
            except Exception as exc:  # a bug must not show a traceback: say what happened, keep the app alive
                log.exception("Handler %s failed", handler.__name__)
                return {message: f"{symbol} Unexpected error ({type(exc).__name__}: {exc}). {advice}"}

        return guarded

    return wrap
