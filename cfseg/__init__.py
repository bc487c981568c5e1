"""cfseg: classifier-free, prototype-based continual 3D medical image segmentation."""

from cfseg._torchvision_compat import install_import_hook as _install_tv_hook

__version__ = "0.1.0"

_install_tv_hook()


def segment(image, checkpoint, classes=None, **kwargs):
    """Segment a NIfTI image (path or nibabel image) with a cfseg checkpoint; see :func:`cfseg.segmentation.segment`.

    Returns a dict of nibabel images in the input's geometry (imported lazily so ``import cfseg`` stays light).
    """
    # function-local: `import cfseg` stays free of torch, monai and lightning (seconds at start-up)
    from cfseg.segmentation import segment as _segment

    return _segment(image, checkpoint, classes, **kwargs)


def correct(image, masks, checkpoint, state, **kwargs):
    """Teach the online corrector in ``state`` from one corrected case; see :func:`cfseg.correction.correct`.

    Returns ``(corrector, report)``; then ``cfseg.segment(..., online=state)`` fuses it with the checkpoint.
    """
    # function-local: `import cfseg` stays free of torch, monai and lightning (seconds at start-up)
    from cfseg.correction import correct as _correct

    return _correct(image, masks, checkpoint, state, **kwargs)
