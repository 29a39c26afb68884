"""Data-parallel scaling: the same run in one process and in N processes (torchrun, one per GPU on CUDA,
gloo on CPUs), timed from each run's ``metrics.csv`` (the median step after the first ``--warmup`` steps).

    python bench/data_parallel.py                               # built-in tiny SD 1.5, 1 and 2 processes
    python bench/data_parallel.py --preset sdxl-24gb --processes 8 --set model.base=/models/sdxl

One JSON line per run: processes, batch per process, global batch, sec_per_step and samples_per_sec; then
the speed-up of N processes over one process at the same per-process batch, and over one process at the
same global batch.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw


def make_images(folder: Path, count: int = 16, size: int = 256) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(image).ellipse([index, index, size - index, size // 2 + index], fill=(index * 15, 80, 160))
        image.save(folder / f"{index:02d}.png")
        (folder / f"{index:02d}.txt").write_text(f"sks, shape {index}", encoding="utf-8")
    return folder


def run(args, work: Path, processes: int, batch: int) -> dict:
    output = work / f"p{processes}-b{batch}"
    sets = [f"dataset.dir={args.dataset}", f"output.dir={output}", f"train.batch_size={batch}",
            f"train.max_steps={args.steps}", "sample.every=0", "sample.prompts=[]", "output.save_every=0",
            *args.overrides]
    command = ["-m", "lora_gui", "train", "--no-plan", "--preset", args.preset,
               *[part for item in sets for part in ("--set", item)]]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *command]
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the run of {processes} process(es) failed:\n{done.stderr[-3000:]}")
    with (output / "metrics.csv").open() as handle:
        seconds = [float(row["sec_per_step"]) for row in csv.DictReader(handle)][args.warmup:]
    step = statistics.median(seconds)
    result = {"processes": processes, "batch_per_process": batch, "global_batch": batch * processes,
              "sec_per_step": round(step, 4), "samples_per_sec": round(batch * processes / step, 2)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd15-cpu-demo")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="batch per process")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dataset", help="a dataset folder (default: 16 generated images)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lora-gui-dp-bench-") as folder:
        work = Path(folder)
        args.dataset = args.dataset or str(make_images(work / "images"))
        alone = run(args, work, 1, args.batch)
        together = run(args, work, args.processes, args.batch)
        same_global = run(args, work, 1, args.batch * args.processes)
    print(json.dumps({
        "speedup_vs_one_process_same_batch_per_process": round(together["samples_per_sec"] / alone["samples_per_sec"], 2),
        "speedup_vs_one_process_same_global_batch": round(together["samples_per_sec"] / same_global["samples_per_sec"], 2),
    }))


if __name__ == "__main__":
    main()
