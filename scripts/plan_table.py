"""Print README's table of every GPU preset's memory plan (``lora-gui plan --preset NAME`` for each)."""

from __future__ import annotations

from lora_gui.config import build_config, list_presets, preset_description
from lora_gui.engine.families.registry import family_names
from lora_gui.engine.planner import GIB, plan_memory


def gpu_presets() -> list[str]:
    """Every GPU preset, by family (the registry's order) and then by card size."""
    names = [name for name in list_presets() if not name.endswith("cpu-demo")]
    order = family_names()

    def key(name: str) -> tuple[int, float]:
        described = preset_description(name)
        family = described.get("family", "")
        return (order.index(family) if family in order else len(order), described["vram_gb"])

    return sorted(names, key=key)


def main() -> None:
    print("| preset | training step (GiB) | validation sampling (GiB) | peak with allowance (GiB) | card (GB) | headroom "
          "| captions encoded on (text encoders, GiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in gpu_presets():
        card = preset_description(name)["vram_gb"]
        plan = plan_memory(build_config(preset=name))
        print(f"| {name} | {plan.phases['training step'] / GIB:.1f} | {plan.phases['validation sampling'] / GIB:.1f} "
              f"| {plan.total_bytes / GIB:.1f} | {card:g} | {plan.headroom(card):.0%} "
              f"| {'GPU' if plan.captions_on_gpu(card) else 'CPU'} ({plan.phases['caching captions'] / GIB:.1f}) |",
              flush=True)


if __name__ == "__main__":
    main()
