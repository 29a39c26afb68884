#!/usr/bin/env bash
# Every GPU preset through train_step.py, one JSON line each (needs a CUDA GPU).
set -u
cd "$(dirname "$0")/.."
for family in sd15 sdxl flux; do
    for tier in 8gb 12gb 16gb 24gb 48gb; do
        python bench/train_step.py --preset "$family-$tier" --steps "${STEPS:-10}" ||
            echo "{\"preset\": \"$family-$tier\", \"error\": \"failed (see stderr)\"}"
    done
done
