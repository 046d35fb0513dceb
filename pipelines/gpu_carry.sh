#!/usr/bin/env bash
# Make .gpu_carry/ (git-ignored), what a lent GPU machine lacks for pipelines/bridge_gpu.sh: wheels of the
# packages its image does not hold (for its Python 3.12) and an MR training subset small enough to travel
# (the device copies the working tree, ~46 MB of it tracked, plus carried paths: 64 MiB in all).
#
#   bash pipelines/gpu_carry.sh [MAX_MB_OF_DATA]      then   run(carry=[".gpu_carry"], command=...)
#
# The subset is every real MR training volume (the MNI152 parts and the other real heads, ~7 MB) plus as many
# synthetic subjects as fit MAX_MB_OF_DATA (default 9) in all, in data/datalist.json's order; validation entries
# are kept out (the bank and the stages read training only).
set -euo pipefail
cd "$(dirname "$0")/.."
max_mb=${1:-9}
py=.venv/bin/python
[ -f data/datalist.json ] || { echo "run medldm data prepare first (data/datalist.json is missing)" >&2; exit 2; }
rm -rf .gpu_carry && mkdir -p .gpu_carry/wheels .gpu_carry/data
grep -qx "/.gpu_carry/" .git/info/exclude 2>/dev/null || echo "/.gpu_carry/" >> .git/info/exclude
pins=$("$py" -m pip list --format=freeze 2>/dev/null | grep -i -E "^(monai|nibabel|pydicom|pydantic|pydantic_core|annotated-types|typing-inspection|einops)==")
"$py" -m pip download -q --dest .gpu_carry/wheels --python-version 3.12 --only-binary=:all: --no-deps $pins
"$py" - "$max_mb" <<'PY'
import json, shutil, sys
from pathlib import Path
budget = float(sys.argv[1]) * 2**20
src = json.loads(Path("data/datalist.json").read_text())
kept, used = [], 0
for e in src["training"]:
    if e.get("modality") != "MR":
        continue
    size = Path("data", e["image"]).stat().st_size
    if e["source"] == "synthetic" and used + size > budget:
        continue
    Path(".gpu_carry/data", e["image"]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path("data", e["image"]), Path(".gpu_carry/data", e["image"]))
    kept.append(e)
    used += size
out = {**{k: v for k, v in src.items() if k not in ("training", "validation", "test_ood")}, "training": kept,
       "validation": [], "subset_of": "data/datalist.json (pipelines/gpu_carry.sh)"}
Path(".gpu_carry/data/datalist.json").write_text(json.dumps(out, indent=1))
print(f"{len(kept)} MR training volumes, {used / 2**20:.1f} MB")
PY
du -sh .gpu_carry
