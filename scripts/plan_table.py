"""Print README's table of every GPU preset's memory plan (``lora-gui plan --preset NAME`` for each)."""

from __future__ import annotations

from lora_gui.config import build_config, list_presets, preset_description
from lora_gui.engine.planner import GIB, plan_memory


def main() -> None:
    print("| preset | training step (GiB) | validation sampling (GiB) | peak with allowance (GiB) | card (GB) | headroom "
          "| captions encoded on (text encoders, GiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in list_presets():
        if name.endswith("cpu-demo"):
            continue
        card = preset_description(name)["vram_gb"]
        plan = plan_memory(build_config(preset=name))
        print(f"| {name} | {plan.phases['training step'] / GIB:.1f} | {plan.phases['validation sampling'] / GIB:.1f} "
              f"| {plan.total_bytes / GIB:.1f} | {card:g} | {plan.headroom(card):.0%} "
              f"| {'GPU' if plan.captions_on_gpu(card) else 'CPU'} ({plan.phases['caching captions'] / GIB:.1f}) |",
              flush=True)


if __name__ == "__main__":
    main()
