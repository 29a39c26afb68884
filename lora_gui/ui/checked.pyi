"""Number, Slider and choice components whose values the handlers check, not Gradio.

Gradio checks a Number's or Slider's range before the handler runs and answers a value out of range with
a toast that names no field, a traceback in the terminal and an "Error" badge on every output of the
event. These components pass the value on as it came (rounded to their precision when it is a finite
number), and each handler refuses it with a message that names the field and its range. The browser
still shows the range: the limits stay on the component.

They are classes because Gradio rebuilds a component from its class when a handler updates it. Gradio
writes a type-stub file (``checked.pyi``) next to any module that defines components; it is kept in the
repository, so that it is not written at run time.
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


class ShownAsGradios:
    """Shown in the page by its Gradio base class's own frontend (Gradio would look for one of this name)."""

    @classmethod
    def get_block_name(cls) -> str:
        gradio_base = next(base for base in cls.__mro__ if base.__module__.startswith("gradio."))
        return gradio_base.__name__.lower()  # what Gradio's own Block.get_block_name gives it


class NumberAsSent(ShownAsGradios):
    def preprocess(self, payload: Any) -> Any:
        return as_sent(payload, self.precision)

    def postprocess(self, value: Any) -> Any:
        return as_shown(value, self.precision)


class ChoiceAsSent(ShownAsGradios):
    """A choice that reaches the handler as sent (Gradio refuses a value not among the choices with a traceback
    in the terminal; a share link can send any value). Each handler checks it."""

    def preprocess(self, payload: Any) -> Any:
        return payload

from gradio.events import Dependency

class CheckedNumber(NumberAsSent, gr.Number):
    pass
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class CheckedSlider(NumberAsSent, gr.Slider):
    pass
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class CheckedDropdown(ChoiceAsSent, gr.Dropdown):
    pass
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class CheckedRadio(ChoiceAsSent, gr.Radio):
    pass
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class CheckedCheckboxGroup(ChoiceAsSent, gr.CheckboxGroup):
    pass
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component