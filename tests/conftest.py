import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def builtin_model_cache(tmp_path_factory) -> Path:
    """Built-in tiny models are built once per test session in a private cache (no network)."""
    cache = Path(os.environ.get("LORA_GUI_TEST_CACHE") or tmp_path_factory.mktemp("model-cache"))
    os.environ["LORA_GUI_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return cache
