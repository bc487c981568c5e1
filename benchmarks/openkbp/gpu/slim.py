"""Slim trained checkpoints for the trip back (<16 MiB each): drop optimizer/loop state and the EWC Fisher."""
import sys
from pathlib import Path

import torch

runs, out = Path(sys.argv[1]), Path(sys.argv[2])
for ck in sorted(runs.glob("*/logs/version_0/checkpoints/joint.ckpt")):
    name = ck.parts[-5]
    c = torch.load(ck, map_location="cpu", weights_only=True)
    for k in ("optimizer_states", "loops", "lr_schedulers", "callbacks"):
        c.pop(k, None)
    c["cfseg"].pop("ewc_fisher", None)
    torch.save(c, out / f"{name}.ckpt")
    print(name, "step", c.get("global_step"), "->", (out / f"{name}.ckpt").stat().st_size, "bytes")
