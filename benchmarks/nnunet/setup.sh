#!/usr/bin/env bash
# Creates .venv-nnunet (repo root, git-ignored) with nnunetv2 from the package registry, torch pinned to the CPU
# wheel by benchmarks/nnunet/constraints.txt. Separate from cfseg's .venv: nothing here is a dependency of cfseg
# or of `make test`. Writes the installed versions to benchmarks/nnunet/versions.txt.
#   bash benchmarks/nnunet/setup.sh            (NNUNET_VERSION=2.8.1 by default)
#
# torchvision: nnunetv2 -> dynamic-network-architectures -> timm -> torchvision, and the only torchvision that
# accepts torch 2.13.0 here is a CUDA build whose compiled ops fail to load with CPU torch ("operator
# torchvision::nms does not exist"). nnU-Net's trainer lookup imports every trainer module, some of which import
# timm, so without a fix `nnUNetv2_train -tr <any custom trainer>` fails. The fix is cfseg's own
# (cfseg/_torchvision_compat.py): a start-up .pth loads that one file by path (it needs only the standard library
# and torch; cfseg itself is not installed here) and defines the two op schemas only when the ops cannot load.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${NNUNET_VENV:-.venv-nnunet}
NNUNET_VERSION=${NNUNET_VERSION:-2.8.1}
PYTHON=${PYTHON:-python3}
HERE=benchmarks/nnunet
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --upgrade --quiet pip
"$VENV/bin/python" -m pip install --quiet -c "$HERE/constraints.txt" "nnunetv2==$NNUNET_VERSION"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
COMPAT="$(pwd)/cfseg/_torchvision_compat.py"
# a module (imported once, even when site-packages is seen twice through a lib64 link) and its start-up .pth
cat > "$SITE/cfseg_nnunet_tvc.py" <<PY
"""Loads cfseg's torchvision start-up fix by path (written by benchmarks/nnunet/setup.sh)."""
import importlib.util as _u
_s = _u.spec_from_file_location("cfseg_torchvision_compat", "$COMPAT")
_m = _u.module_from_spec(_s)
_s.loader.exec_module(_m)
_m.install_import_hook()
PY
echo "import cfseg_nnunet_tvc" > "$SITE/cfseg_nnunet_tvc.pth"
rm -f "$SITE/cfseg_torchvision_compat.pth"
# the custom trainers are found through nnU-Net's nnUNet_extTrainer (set by run_equal_terms.sh); check they load
nnUNet_extTrainer="$(pwd)/$HERE/trainers" "$VENV/bin/python" -c "
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f
import torch, torchvision
print('trainer found:', f('nnUNetTrainer_cfsegEqual_s0').__name__, '| torch', torch.__version__, '| torchvision', torchvision.__version__)"
"$VENV/bin/python" -m pip freeze | grep -iE '^(nnunetv2|torch|torchvision|timm|dynamic.network.architectures|batchgenerators|batchgeneratorsv2|acvl.utils|numpy|SimpleITK|nibabel|blosc2|scipy|scikit-image)==' \
    | tee "$HERE/versions.txt"
