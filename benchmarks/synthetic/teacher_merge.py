"""Diagnostic: a stage's student with its weights averaged with the teacher's, scored as the protocol scores.

After stage ``--stage`` of a protocol row, ``(1 - a) * student + a * teacher`` for each ``a`` (the network's
floating-point weights; the prototype bank and the learnt temperature stay the student's), scored on the
validation and test cases of stages 0..stage (``cfseg.experiments.report.evaluate_stage_tests``). Endpoints Weight
Fusion (Xiao et al., CVPR 2023) merges this way after each class-incremental step. Not part of any strategy:
benchmarks/README.md ("Protocol version 2") gives the result.

    python benchmarks/synthetic/teacher_merge.py --config configs/incremental/synthetic_v2.yaml \
        --output results/synth_full_lr --rows distill distill_kd5_ramp --stage 2 --alphas 0 0.2 0.4 --seeds 0 1 2
"""

import argparse
import json
from pathlib import Path

import torch

from cfseg.experiments.protocol import load_protocol
from cfseg.experiments.report import evaluate_stage_tests


def merged(teacher: dict, student: dict, a: float) -> dict:
    """The student's checkpoint with ``net.*`` float weights ``(1 - a) * student + a * teacher``."""
    sd = dict(student["state_dict"])
    for k, v in sd.items():
        if k.startswith("net.") and k != "net.log_logit_scale" and torch.is_tensor(v) and v.is_floating_point():
            sd[k] = (1 - a) * v + a * teacher["state_dict"][k]
    return {**student, "state_dict": sd}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--output", required=True, help="the protocol's output folder (seed<N>/runs/<row>_stage<i>)")
    p.add_argument("--rows", nargs="+", required=True)
    p.add_argument("--stage", type=int, required=True, help="incremental stage whose student is merged (>= 1)")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.2, 0.4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--work", default="results/teacher_merge", help="where the merged checkpoints go")
    a = p.parse_args()
    spec, root, out = load_protocol(a.config), Path(a.output), {}
    for seed in a.seeds:
        for row in a.rows:
            runs = root / f"seed{seed}" / "runs"
            teacher = torch.load(runs / ("stage0" if a.stage == 1 else f"{row}_stage{a.stage - 1}") / "final.ckpt",
                                 map_location="cpu", weights_only=True)
            student = torch.load(runs / f"{row}_stage{a.stage}" / "final.ckpt", map_location="cpu", weights_only=True)
            for alpha in a.alphas:
                ckpt = Path(a.work) / f"seed{seed}_{row}_stage{a.stage}_a{alpha}" / "final.ckpt"
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                torch.save(merged(teacher, student, alpha), ckpt)
                val = evaluate_stage_tests(ckpt, spec, a.stage, seed=seed, split="val")[0]
                test = evaluate_stage_tests(ckpt, spec, a.stage, seed=seed, split="test")[0]
                out[f"{seed}/{row}/{alpha}"] = {"val": val, "test": test}
                print(f"seed {seed} {row} a={alpha}: val {[round(v, 3) for v in val]}, "
                      f"test {[round(v, 3) for v in test]}", flush=True)
    (Path(a.work) / f"stage{a.stage}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
