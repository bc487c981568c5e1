"""On the GPU: folded vs unfolded sliding-window logits of a trained prototype-head checkpoint."""
import sys

import torch
from monai.inferers import sliding_window_inference

from cfseg.module import load_checkpoint

dev = "cuda" if torch.cuda.is_available() else "cpu"
m = load_checkpoint(sys.argv[1]).to(dev).eval()
g = torch.Generator().manual_seed(0)
x = torch.rand(1, 1, 112, 96, 80, generator=g).to(dev)
h = m.hparams
with torch.no_grad():
    folded = m.sliding_window_logits(x)
    plain = sliding_window_inference(x, roi_size=tuple(h.roi_size), sw_batch_size=h.sw_batch_size,
                                     predictor=lambda t: m(t), overlap=h.sw_overlap, mode="gaussian")
    for cls in ([0, 2], [6]):
        f2 = m.sliding_window_logits(x, cls)
        p2 = sliding_window_inference(x, roi_size=tuple(h.roi_size), sw_batch_size=h.sw_batch_size,
                                      predictor=lambda t, cls=cls: m(t, cls), overlap=h.sw_overlap, mode="gaussian")
        print("classes", cls, "max |diff|", (f2 - p2).abs().max().item(),
              "labels differ", int((f2.argmax(1) != p2.argmax(1)).sum()))
print("device", folded.device, "fold cached:", getattr(m.net.backbone, "_cfseg_output_layer", None) is not None)
print("all classes: max |logit diff|", (folded - plain).abs().max().item(), "of max |logit|", plain.abs().max().item())
print("labels differ:", int((folded.argmax(1) != plain.argmax(1)).sum()), "of", folded[0, 0].numel())
