"""Model cards: what a shipped model is, how it was made, how good it is, and what it is not for."""

from __future__ import annotations

from medldm.evaluation.evaluate import markdown_table


def model_card(meta: dict, rows: list[dict], command: str, machine: str) -> str:
    t = meta.get("training", {})
    vae_t = t.get("vae_training") or {}
    deg = meta.get("degradation", {})
    return f"""# Model card: `{meta.get('name')}`

**Task:** {meta.get('task')} · **modality:** {meta.get('modality')} · **format:** {meta.get('format')} ·
**medldm:** {meta.get('medldm_version')} · weights stored as {meta.get('weights_dtype', 'float32')} safetensors.

## What it is
A 2D latent diffusion model applied slice-wise (slice axis {meta.get('slice_axis')}): a MONAI AutoencoderKL
(channels {meta['vae']['channels']}, {meta['vae']['latent_channels']} latent channels, latent scale
{meta.get('latent_scale'):.4g}), a MONAI DiffusionModelUNet conditioned by concatenation on the encoded naive
inverse (with noise augmentation, level as an input channel), sampled with DDIM, then a pixel-space refiner
(MONAI BasicUNet) that sees the decoded estimate and the naive inverse, then hard data consistency
(recon, SR). Intensity normalisation: `{meta.get('normalisation')}`.

Trained degradation: `{deg}`.

## Training
- Data: `medldm data prepare` (MNI152 2009a T1 outside the held-out slab, 20 synthetic subjects drawn from
  the MNI152 tissue maps with the same hold-out, and for CT the InVesalius head CT below its top 32 slices);
  see `data_cards/`.
- VAE: {vae_t.get('steps')} steps, {vae_t.get('seconds')} s; diffusion U-Net + refiner: {t.get('steps')} steps,
  {t.get('seconds')} s, on {machine}.
- Reproduce: `{command}`

## Validation (held-out data, fastMRI metric conventions; see medldm/evaluation/metrics.py)
{markdown_table(rows)}
`VAE(truth)` is the VAE's own reconstruction of the ground truth: the ceiling of any latent-only output.

## Intended use and limits
Research only: not a medical device, not for diagnosis. Trained on a population-average template, synthetic
subjects and (CT) one real head: expect failures on pathology, other anatomy, other contrasts and
scanners, implants, motion, and on intensity ranges far from training. Outputs can look plausible and be
wrong; read the uncertainty map and the data-consistency residual, and compare with the input.
"""
