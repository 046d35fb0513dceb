#!/usr/bin/env bash
# Refiner stages (stage 3) of the shipped MR models on one CUDA GPU, starting from the shipped model folders
# (their float16 U-Net and VAE are exactly what inference runs), guides made in DataLoader workers.
#
#   bash pipelines/refiner_stages_gpu.sh OUT_DIR [MINUTES] [WORKERS] [MODEL ...]   (default: mr-denoise mr-recon)
#
# mr-denoise: a fresh refiner on the Rician-corrected NLM guide (shipped: 3.6 min, 14 workers, one H100,
# 1,330 steps). mr-recon: the TV-POCS-guided refiner continued (init: model): 139 steps in 3.6 min (mr-denoise's
# loop ran 6.2 steps/s and one worker makes a TV-POCS batch in 0.98 s). With the cascade's k-space projections
# moved from the CPU onto the GPU, a later H100 leg (2026-11-26) ran 892 steps in 7.4 min, 2.0 steps/s, with the
# GPU 3-15% busy: the host side still limits it (not profiled). That leg's weights were lost with its machine.
# The shipped mr-recon refiner is that stage continued another 20 minutes on the CPU (README, Results).
# Each model's own settings (guide, cascades, ...) come from its config; this script only sets time and workers.
# Each stage writes OUT_DIR/<name>/model, and OUT_DIR/<name>.tar of it with its losses (for machines that hand
# back single files). Install with
#   python pipelines/train_default_models.py --only <name> --install-stage OUT_DIR/<name>/model
set -euo pipefail
out=$(realpath -m -- "${1:?usage: refiner_stages_gpu.sh OUT_DIR [MINUTES] [WORKERS] [MODEL ...]}")
minutes=${2:-3.6}
workers=${3:-14}
models=("${@:4}")
[ ${#models[@]} -gt 0 ] || models=(mr-denoise mr-recon)
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."

stage() {  # name, then --set overrides of the model's cpu config
  local name=$1; shift
  echo "== $name: $(date -u +%T)"
  "$py" -m medldm train refiner --config "configs/ldm-$name-cpu.yaml" --model "medldm/shipped/$name" --out "$out/$name" \
    --device cuda --set "refiner_stage.max_minutes=$minutes" --set "refiner_stage.num_workers=$workers" \
    --set tracking.enabled=false "$@"
  tar -C "$out" -cf "$out/$name.tar" "$name/model" "$name/losses.json"
}

for name in "${models[@]}"; do
  case $name in
    mr-denoise) stage mr-denoise ;;
    mr-recon) stage mr-recon --set refiner_stage.init=model ;;
    *) echo "no GPU refiner stage for $name (mr-denoise, mr-recon)" >&2; exit 2 ;;
  esac
done
echo "== done: $(date -u +%T)"
