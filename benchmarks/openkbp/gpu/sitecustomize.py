# Device runs only: plain float32 convolutions and matmuls on the GPU (no TF32), as on the CPU runs they sit beside.
try:
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
except Exception as e:  # noqa: BLE001
    print("sitecustomize: could not set TF32 flags:", e)
