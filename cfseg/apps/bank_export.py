"""Write and inspect precomputed text-embedding bank files: export-bank, show-bank.

``python -m cfseg.apps.bank_export export-bank --encoder SPEC --classes A B ... --modality ct --out bank.json``
embeds the class names once (e.g. with CLIP on a connected machine); the encoder spec ``bank:/path/bank.json``
then uses the file where the encoder's weights are missing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cfseg.text.bank_file import save_bank_file
from cfseg.text.encoders import EncoderWeightsError, PrecomputedTextEncoder, build_encoder


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``export-bank`` or ``show-bank`` (see the module docstring) on ``argv``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m cfseg.apps.bank_export", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser(
        "export-bank",
        help="embed class names once (e.g. with CLIP on a connected machine) and write a bank file",
    )
    ex.add_argument("--encoder", default="minilm", help="encoder spec, e.g. open_clip:ViT-B-32:laion2b_s34b_b79k")
    ex.add_argument("--classes", nargs="+", required=True, help="class names (background is always included)")
    ex.add_argument("--modality", default="generic", help="prompt set: generic, ct or mri")
    ex.add_argument("--templates", nargs="+", default=None, help="custom prompt templates containing {name}")
    ex.add_argument("--out", required=True, help="output JSON file")
    ex.add_argument("--device", default="cpu")
    show = sub.add_parser("show-bank", help="print what a bank file holds")
    show.add_argument("path")
    args = parser.parse_args(argv)

    if args.command == "show-bank":
        enc = PrecomputedTextEncoder(args.path)
        print(f"{enc.path}: encoder {enc.encoder_id}, dim {enc.dim}, modality {enc.modality}")
        for n in enc.names:
            print(f"  {n}: {enc.prompts.get(n, [])}")
        return 0
    spec: str | dict = args.encoder
    if args.device != "cpu" and isinstance(spec, str) and spec.startswith(("open_clip:", "minilm")):
        head, _, rest = spec.partition(":")
        if head == "open_clip":
            model_name, _, pre = rest.partition(":")
            spec = {
                "kind": "open_clip",
                "model_name": model_name,
                "pretrained": pre or None,
                "device": args.device,
            }
        else:
            spec = {"kind": "minilm", "model_path": rest or None, "device": args.device}
    encoder = build_encoder(spec)
    out = save_bank_file(args.out, encoder, args.classes, args.modality, args.templates)
    print(f"wrote {out}: {len(args.classes)} classes + background, encoder {encoder.encoder_id}, dim {encoder.dim}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (EncoderWeightsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
