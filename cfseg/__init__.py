"""cfseg: classifier-free, prototype-based continual 3D medical image segmentation."""

from cfseg._torchvision_compat import install_import_hook as _install_tv_hook

__version__ = "0.1.0"

_install_tv_hook()
