#!/bin/bash
# Build .gpu/ (git-ignored through .git/info/exclude) for a GPU machine that has PyTorch, Lightning and torchmetrics
# but no package registry and no ../shared/data: the missing wheels, the OpenKBP training and validation cases of
# configs/openkbp/split_joint.json (test cases stay here; they are scored here), a split file without test cases,
# and the MiniLM text-embedding bank of the seven organs (the same prototypes as `model.encoder: minilm`).
#   bash benchmarks/openkbp/gpu/prepare.sh && then run: bash benchmarks/openkbp/gpu/run.sh   (on the GPU machine)
set -eu
cd "$(dirname "$0")/../../.."
PY=${PY:-.venv/bin/python}
G=.gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
mkdir -p $G/whl $G/pyinit
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d $G/whl \
  monai==1.6.1 nibabel==5.4.2 jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0 \
  importlib_resources==7.1.0
cp benchmarks/openkbp/gpu/sitecustomize.py $G/pyinit/
$PY - <<'P'
import json, shutil
from pathlib import Path
src, dst = Path("../shared/data/openkbp_oar"), Path(".gpu/data/openkbp_oar")
split = json.loads(Path("configs/openkbp/split_joint.json").read_text())
ids = split["train"] + split["val"]
for sub in ("imagesTr", "labelsTr"):
    (dst / sub).mkdir(parents=True, exist_ok=True)
for i in ids:
    shutil.copy(src / "imagesTr" / f"{i}_0000.nii.gz", dst / "imagesTr")
    shutil.copy(src / "labelsTr" / f"{i}.nii.gz", dst / "labelsTr")
shutil.copy(src / "dataset.json", dst)
partial = json.loads((src / "partial_labels.json").read_text())
(dst / "partial_labels.json").write_text(json.dumps({i: partial[i] for i in ids if i in partial}, indent=1))
Path(".gpu/split_device.json").write_text(json.dumps({"train": split["train"], "val": split["val"], "test": []}))
print(f"{len(ids)} cases copied")
P
$PY -m cfseg.apps.bank_export export-bank --encoder minilm --modality ct --out $G/bank_minilm_ct.json \
  --classes brainstem spinal_cord parotid_gland_right parotid_gland_left esophagus larynx mandible
du -sh $G
