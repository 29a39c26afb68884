"""Number and Slider components whose values the handlers check, not Gradio.

Gradio checks a Number's or Slider's range before the handler runs and answers a value out of range with
a toast that names no field, a traceback in the terminal and an "Error" badge on every output of the
event. These components pass the value on as it came (rounded to their precision when it is a finite
number), and each handler refuses it with a message that names the field and its range. The browser
still shows the range: the limits stay on the component.
"""

from __future__ import annotations

import math
from typing import Any

import gradio as gr


def as_sent(payload: Any, precision: int | None) -> Any:
    """The value a handler gets: a finite number rounded to ``precision``, anything else unchanged."""
    if isinstance(payload, bool) or not isinstance(payload, int | float) or not math.isfinite(payload):
        return payload
    return gr.Number.round_to_precision(payload, precision)


def as_shown(value: Any, precision: int | None) -> Any:
    """What a handler's reply puts in the field: a number, or an empty field for anything else (a form
    sent back with a value that was never a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return gr.Number.round_to_precision(value, precision)


def _checked(component):
    """The component with the two conversions above (set on the instance: a subclass would make Gradio write
    a type-stub file next to this module)."""
    component.preprocess = lambda payload: as_sent(payload, component.precision)
    component.postprocess = lambda value: as_shown(value, component.precision)
    return component


def CheckedNumber(*args, **kwargs) -> gr.Number:  # noqa: N802 (used like the component class it makes)
    return _checked(gr.Number(*args, **kwargs))


def CheckedSlider(*args, **kwargs) -> gr.Slider:  # noqa: N802
    return _checked(gr.Slider(*args, **kwargs))
