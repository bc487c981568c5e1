"""Predict a folder of images with one nnU-Net checkpoint at a fixed number of CPU threads, or on a GPU with
``--device cuda`` (nnU-Net environment).

``nnUNetv2_predict -device cpu`` sets torch to every core; this calls nnU-Net's own predictor with
``OMP_NUM_THREADS`` threads and one worker for pre-processing and export. Sliding windows with nnU-Net's defaults
(step 0.5 of the patch, Gaussian weighting); test-time mirroring off unless ``--tta`` (cfseg predicts without it).
Cases already in the output folder are kept (an interrupted run resumes).

    .venv-nnunet/bin/python benchmarks/nnunet/predict.py --model <results>/<trainer>__<plans>__3d_fullres \\
        --checkpoint checkpoint_final.pth --input results/nnunet/nnUNet_raw/Dataset501_OpenKBP/imagesTs --output DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="nnU-Net training output folder (holds fold_0)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--fold", default="0")
    p.add_argument("--tta", action="store_true", help="nnU-Net's test-time mirroring")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    threads = int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    torch.set_num_threads(threads)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=args.tta,
                                perform_everything_on_device=args.device == "cuda", device=torch.device(args.device),
                                verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(args.model, use_folds=(int(args.fold),),
                                                   checkpoint_name=args.checkpoint)
    t0 = time.perf_counter()
    predictor.predict_from_files(args.input, args.output, save_probabilities=False, overwrite=False,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)
    seconds = time.perf_counter() - t0
    info = {"model": str(args.model), "checkpoint": args.checkpoint, "tta": args.tta, "threads": threads,
            "device": args.device, "tile_step_size": 0.5, "predict_seconds": round(seconds, 1)}
    Path(args.output, "predict_info.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
