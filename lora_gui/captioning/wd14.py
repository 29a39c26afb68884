"""WD14-style booru tagger (SmilingWolf's wd taggers): comma-separated tags above a confidence threshold.

Runs the repos' ``model.onnx`` with onnxruntime (``onnxruntime-gpu`` for CUDA) and names the
outputs from ``selected_tags.csv``. The models take NHWC float32 BGR pixels in 0..255, padded to
a white square; they output one probability per tag.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_gui.captioning.base import Captioner, CaptionerError, Placement
from lora_gui.captioning.weights import model_folder
from lora_gui.events import Emit, Status

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

FILES = ["model.onnx", "selected_tags.csv"]
GENERAL, CHARACTER, RATING = 0, 4, 9
DEFAULT_SIZE = 448
# Tags whose underscores are part of the face they draw, so they stay.
KAOMOJIS = frozenset({"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
                      "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"})


@dataclass(frozen=True)
class Tag:
    name: str
    category: int


class Wd14Captioner(Captioner):
    name = "wd14"
    label = "WD14 tagger: booru tags (anime and illustration)"
    default_model = "SmilingWolf/wd-vit-tagger-v3"
    default_batch_size = 16

    def __init__(self, model: str | None = None, *, threshold: float = 0.35, character_threshold: float = 0.85,
                 include_rating: bool = False, replace_underscores: bool = True,
                 exclude_tags: tuple[str, ...] | list[str] = (), cache_dir: str | None = None) -> None:
        super().__init__(model, cache_dir)
        for label, value in (("threshold", threshold), ("character_threshold", character_threshold)):
            if not 0.0 < value <= 1.0:
                raise CaptionerError(f"The wd14 {label} must be between 0 and 1 (got {value}); 0.35 is typical "
                                     "for general tags, 0.85 for characters.")
        self.threshold = threshold
        self.character_threshold = character_threshold
        self.include_rating = include_rating
        self.replace_underscores = replace_underscores
        self.exclude = {_key(tag) for tag in exclude_tags if tag.strip()}
        self._session: Any = None
        self._tags: list[Tag] = []
        self._input: Any = None

    def _load(self, placement: Placement, progress: Emit) -> None:
        folder = model_folder(self.model, FILES, FILES, "WD14 tagger", progress, self.cache_dir)
        self._tags = read_tags(folder / "selected_tags.csv")
        self._session = _open_session(folder / "model.onnx", placement, progress)
        self._input = self._session.get_inputs()[0]
        width = self._session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != len(self._tags):
            raise CaptionerError(f"{folder}: model.onnx predicts {width} tags but selected_tags.csv lists "
                                 f"{len(self._tags)}. The two files come from different taggers: download both "
                                 "from the same repo.")

    def _caption(self, images: list[Image.Image], paths: list[Path]) -> list[str]:
        import numpy as np

        channels_first = self._input.shape[1] == 3 and self._input.shape[-1] != 3
        size = self._input.shape[2 if channels_first else 1]
        size = size if isinstance(size, int) else DEFAULT_SIZE
        batch = np.stack([prepare_image(image, size) for image in images])
        if channels_first:
            batch = batch.transpose(0, 3, 1, 2)
        scores = self._run(batch)
        return [", ".join(self.pick_tags(row)) for row in scores]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import numpy as np

        fixed = self._input.shape[0]
        if isinstance(fixed, int) and fixed > 0 and fixed != len(batch):  # exported with a fixed batch size
            return np.concatenate([self._run(batch[i : i + fixed]) for i in range(0, len(batch), fixed)])
        scores = self._session.run(None, {self._input.name: batch})[0]
        if scores.min() < 0.0 or scores.max() > 1.0:  # an export without its final sigmoid
            scores = 1.0 / (1.0 + np.exp(-scores))
        return scores

    def pick_tags(self, scores: np.ndarray) -> list[str]:
        """Tag names above their threshold, most confident first; the likeliest rating last if wanted."""
        chosen, ratings = [], []
        for tag, score in zip(self._tags, scores.tolist(), strict=True):
            if tag.category == RATING:
                ratings.append((score, tag.name))
            elif score >= (self.character_threshold if tag.category == CHARACTER else self.threshold):
                chosen.append((score, tag.name))
        chosen.sort(key=lambda item: -item[0])
        names = [name for _, name in chosen]
        if self.include_rating and ratings:
            names.append(max(ratings)[1])
        return [self._format(name) for name in names if _key(name) not in self.exclude]

    def _format(self, name: str) -> str:
        return name.replace("_", " ") if self.replace_underscores and name not in KAOMOJIS else name

    def _release(self) -> None:
        self._session = self._input = None


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """Pad to a white square, resize to ``size`` (bicubic), and return HWC float32 BGR in 0..255."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        canvas = canvas.resize((size, size), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(canvas, dtype=np.float32)[:, :, ::-1])


def read_tags(path: Path) -> list[Tag]:
    """The ``name`` and ``category`` columns of ``selected_tags.csv``, in the model's output order."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        return [Tag(row["name"], int(row["category"])) for row in rows]
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise CaptionerError(f"{path} is not a tagger's tag list (it needs name and category columns): {exc}. "
                             "Download selected_tags.csv again from the tagger's repo.") from exc


def _open_session(path: Path, placement: Placement, progress: Emit) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise CaptionerError("The wd14 tagger needs onnxruntime: run `pip install onnxruntime` (or "
                             "`pip install onnxruntime-gpu` to tag on an NVIDIA GPU).") from None
    providers = ["CPUExecutionProvider"]
    if placement.device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            _preload_cuda_libraries(ort)
            providers.insert(0, "CUDAExecutionProvider")
        else:
            progress(Status("onnxruntime here has no CUDA support, so the wd14 tagger runs on the CPU "
                            "(pip install onnxruntime-gpu to use the GPU)."))
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:
        raise CaptionerError(f"{path} could not be opened by onnxruntime ({type(exc).__name__}: {exc}). The "
                             "download may be incomplete: delete it (or its cache folder) and try again.") from exc
    if len(providers) > 1 and providers[0] not in session.get_providers():
        progress(Status("onnxruntime could not start CUDA (see its log above), so the wd14 tagger runs on the CPU. "
                        "Check that onnxruntime-gpu matches your CUDA version."))
    return session


def _preload_cuda_libraries(ort: Any) -> None:
    """onnxruntime-gpu can use the CUDA libraries that PyTorch installed (onnxruntime 1.21 and later)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # missing libraries show up as a CPU fallback, which onnxruntime logs
            pass


def _key(tag: str) -> str:
    return tag.strip().lower().replace(" ", "_")
