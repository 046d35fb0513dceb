#!/usr/bin/env bash
# The GPU session's one job (~12 min on one H100): with VAE_MIN > 0 first train the MR VAE on the widened anatomy
# (configs/vae-mr-wide-cpu.yaml, batch 32), then build a latent bank on the machine's CPU cores, train the latent
# U-Net as a guide-to-truth flow on it (medldm train bank / bridge; a fresh U-Net on the new VAE's latents), then
# continue the refiner on the flow's samples (medldm train refiner), for one model; the model folder comes back
# through OUT_DIR.
#
#   bash pipelines/gpu_carry.sh                      # here, first: wheels and a data subset into .gpu_carry/
#   run(carry=[".gpu_carry"], timeout_s=780,
#       command="bash pipelines/bridge_gpu.sh $OUT mr-recon 3000 3 2 14 3")
#   bash pipelines/bridge_gpu.sh OUT_DIR [MODEL] [BANK_BATCHES] [BRIDGE_MIN] [REFINER_MIN] [WORKERS] [VAE_MIN]
#
# Starts from medldm/shipped/MODEL with configs/ldm-MODEL-wide-cpu.yaml where it exists (else -cpu.yaml; bridge_stage
# and refiner_stage as there; the flow's batch is 4x the CPU one). Writes OUT_DIR/MODEL.tar (the model folder, its
# refiner losses, the flow's validation history, the bank recipe):
#   tar -xf MODEL.tar && medldm evaluate --model MODEL/model ... && python pipelines/train_default_models.py \
#       --only MODEL --install-stage MODEL/model
# A tiny CPU rehearsal (tests/test_pipelines.py runs it on a tiny datalist, ~80 s):
#   DEVICE=cpu bash pipelines/bridge_gpu.sh /tmp/x mr-recon 2 0.05 0.05 0 0.05
set -euo pipefail
out=$(realpath -m -- "${1:?usage: bridge_gpu.sh OUT_DIR [MODEL] [BANK_BATCHES] [BRIDGE_MIN] [REFINER_MIN] [WORKERS]}")
name=${2:-mr-recon}
batches=${3:-3000}
bridge_min=${4:-4}
refiner_min=${5:-3}
workers=${6:-14}
vae_min=${7:-0}
device=${DEVICE:-cuda}
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
if ! "$py" -c "import monai, nibabel, pydantic" 2>/dev/null; then
  [ -d .gpu_carry/wheels ] || { echo "monai/nibabel/pydantic missing and no .gpu_carry/wheels (pipelines/gpu_carry.sh)" >&2; exit 2; }
  "$py" -m pip install -q --no-index --no-deps .gpu_carry/wheels/*.whl
fi
datalist=${DATALIST:-data/datalist.json}
[ -f "$datalist" ] || datalist=.gpu_carry/data/datalist.json
work=$out/$name
mkdir -p "$work"
config=configs/ldm-$name-wide-cpu.yaml
[ -f "$config" ] || config=configs/ldm-$name-cpu.yaml
common=(--config "$config" --device "$device" --set tracking.enabled=false --set "data.datalist=$datalist")
if [ "$vae_min" != "0" ]; then
  echo "== vae: $(date -u +%T)"
  "$py" -m medldm train vae --config configs/vae-mr-wide-cpu.yaml --device "$device" --out "$work/vae" \
    --set tracking.enabled=false --set "data.datalist=$datalist" --set "train.max_minutes=$vae_min" \
    --set train.steps=1000000 --set data.batch_size=32 --set "data.num_workers=$workers"
  common+=(--set "bridge_stage.vae=$work/vae/model" --set bridge_stage.init=fresh)
else
  vae=$("$py" -c "from medldm.config import load_config; print(load_config('$config', 'ldm').bridge_stage.vae or '')")
  [ -z "$vae" ] || [ -d "$vae" ] || { echo "$config wants the VAE folder $vae: carry it, or give VAE_MIN > 0" >&2; exit 2; }
fi
echo "== bank: $(date -u +%T)"
"$py" -m medldm train bank "${common[@]}" --model "medldm/shipped/$name" --out "$work/bank" --batches "$batches" \
  --workers "$workers"
echo "== bridge: $(date -u +%T)"
"$py" -m medldm train bridge "${common[@]}" --model "medldm/shipped/$name" --bank "$work/bank" --out "$work/bridge" \
  --set "bridge_stage.max_minutes=$bridge_min" --set bridge_stage.batch_size=64 --set bridge_stage.val_every=500
echo "== refiner: $(date -u +%T)"
"$py" -m medldm train refiner "${common[@]}" --model "$work/bridge/model" --out "$work/refiner" \
  --set refiner_stage.init=model --set "refiner_stage.max_minutes=$refiner_min" --set "refiner_stage.num_workers=$workers"
cp "$work/bank/recipe.json" "$work/refiner/bank_recipe.json"
cp "$work/bridge/history.json" "$work/refiner/bridge_history.json"
# the refiner's model folder holds the flow U-Net too; one tar of ~10 MB (files come back up to 16 MB each)
tar -C "$work" -cf "$out/$name.tar" refiner/model refiner/losses.json refiner/bank_recipe.json refiner/bridge_history.json
rm -rf "$work/bank"  # hundreds of MB that need not come back
echo "== done: $(date -u +%T)"
