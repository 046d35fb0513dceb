"""Model cards: what a shipped model is, how it was made, how good it is, and what it is not for."""

from __future__ import annotations

import json
from pathlib import Path

from medldm.evaluation.evaluate import markdown_table
from medldm.models.model_config import ModelConfig, TrainingRecord


NOT_CLASSICAL = ("medldm", "VAE(truth)", "supervised")
# The evaluation rows a shipped model's card was written from, kept in its folder so that the card (FID rows
# included) can be rewritten on any clone: outputs/ is not committed.
ROWS_FILE = "evaluation.json"


def verdict(rows: list[dict]) -> str:
    """One line per case: the default output against the best classical baseline, the supervised U-Net and
    the VAE ceiling; then the FID line when the rows have one."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows if "psnr" in r):
        rs = [r for r in rows if r["case"] == case and "psnr" in r]
        ours = next((r for r in rs if r["method"] == "medldm (default)"), None)
        best = _best_classical(rs)
        ceiling = next((r for r in rs if r["method"] == "VAE(truth)"), None)
        sup = next((r for r in rs if r["method"].startswith("supervised")), None)
        if ours is None or best is None:
            continue
        word = "beats" if ours["psnr"] > best["psnr"] and ours["ssim"] > best["ssim"] else "does NOT beat"
        d = _ssim_digits(ours, best)
        line = (f"- {case}: medldm {ours['psnr']:.2f} dB / SSIM {ours['ssim']:.{d}f} {word} the best classical baseline "
                f"({best['method']}: {best['psnr']:.2f} dB / {best['ssim']:.{d}f})")
        if sup:
            line += f"; supervised U-Net {sup['psnr']:.2f} dB / {sup['ssim']:.3f}"
        if ceiling:
            line += f"; VAE ceiling {ceiling['psnr']:.2f} dB"
        lines.append(line)
    fid = {r["method"]: r["fid"] for r in rows if r.get("fid") is not None}
    if "medldm (default)" in fid:
        lines.append("- FID (all cases, 3 planes, lower is better): "
                     + ", ".join(f"{m} {v:.1f}" for m, v in sorted(fid.items(), key=lambda kv: kv[1])))
    return "\n".join(lines) or "- no comparable rows"


def _default_path(config) -> str:
    """What one sample does by default, and why (the model's default_use_diffusion)."""
    if config.default_use_diffusion:
        return ("Default path: a diffusion sample, refined (the `medldm (default)` row equals `medldm diffusion`); "
                "`use_diffusion=False` decodes the input's latent instead (`medldm no diffusion`).")
    return ("**Default path: no diffusion.** On the held-out cases a diffusion sample measured no better than decoding "
            "the input's latent (`medldm diffusion` against `medldm no diffusion` below; `benchmarks/steps_quality.py`), "
            "so one sample skips the U-Net (`medldm (default)` equals `medldm no diffusion`; the U-Net was 18-28% of a 181x217x181 "
            "volume's time on 2 CPU cores, benchmarks/README.md). `use_diffusion=True`, `--diffusion`, or two or more samples sample the U-Net and "
            "give the uncertainty map.")


def _best_classical(rs: list[dict]) -> dict | None:
    base = [r for r in rs if not r["method"].startswith(NOT_CLASSICAL)]
    return max(base, key=lambda r: r["psnr"]) if base else None


def _ssim_digits(a: dict, b: dict) -> int:
    """3 decimals, 4 where 3 would print a tie that the comparison (on unrounded values) does not see."""
    return 4 if f"{a['ssim']:.3f}" == f"{b['ssim']:.3f}" and a["ssim"] != b["ssim"] else 3


def _pair(r: dict | None, digits: int = 3) -> str:
    return f"{r['psnr']:.2f} / {r['ssim']:.{digits}f}" if r else "-"


def results_table(rows_by_model: dict[str, list[dict]]) -> str:
    """The README's table: per case, the best classical baseline, the supervised U-Net and the default output
    (bold where it beats every classical baseline on PSNR and SSIM); each model linked to its card."""
    out = ["| model | case | best classical baseline | supervised U-Net | medldm |", "|---|---|---|---|---|"]
    for model, rows in rows_by_model.items():
        for case in dict.fromkeys(r["case"] for r in rows if "psnr" in r):
            rs = {r["method"]: r for r in rows if r["case"] == case and "psnr" in r}
            ours, best = rs.get("medldm (default)"), _best_classical(list(rs.values()))
            if ours is None or best is None:
                continue
            beats = ours["psnr"] > best["psnr"] and ours["ssim"] > best["ssim"]
            d = _ssim_digits(ours, best)
            out.append(f"| [{model}](data_cards/model-{model}.md) | {case} | {best['method']} {_pair(best, d)} | "
                       f"{_pair(rs.get('supervised U-Net'))} | {f'**{_pair(ours, d)}**' if beats else _pair(ours, d)} |")
    return "\n".join(out) + "\n"


GUIDE_WORDS = {"tv-pocs": "TV-POCS (TV alternated with the measurement's projection, computed at inference; for MR "
                          "recon the evaluation's TV-POCS baseline)",
               "tv-pocs-warm": "TV-POCS with Chambolle's dual carried from round to round (`tv_pocs_warm`, computed "
                               "at inference; the evaluation's TV-POCS (warm) baseline)",
               "nlm": "2D non-local means of the noisy input, its Rician bias removed (computed at inference)"}


def _guide_words(guide: str, residual_on_naive: bool) -> str:
    """The card's words for a refiner stage's guide (not the plain naive inverse)."""
    if "+" not in guide:
        adds = " and adds its correction to it" if residual_on_naive else ""
        return f", guided by {GUIDE_WORDS.get(guide, guide)} instead of the naive inverse (it sees that image{adds})"
    parts = guide.split("+")
    names = ["the naive inverse" if p == "naive" else GUIDE_WORDS.get(p, p) for p in parts]
    first = "the naive inverse" if parts[0] == "naive" else parts[0]  # the short name, without its explanation
    adds = f"; it adds its correction to {first}" if residual_on_naive else ""
    return f", guided by {' and by '.join(names)}, stacked as input channels{adds}"


def _widening(legs: list[dict]) -> str:
    """Words for the leg of a warm-started stage whose guide added images to what the refiner it continued saw
    (its input widened, ``widen_refiner_input``); the first leg continued stage 2 (naive). ``legs``: oldest first."""
    for i in range(len(legs) - 1, -1, -1):
        if legs[i].get("init") != "model":
            break
        now = legs[i].get("guide", "naive").split("+")
        seen = (legs[i - 1].get("guide", "naive") if i else "naive").split("+")
        if len(now) > len(seen):
            return f", its input widened to take {' and '.join(now[len(seen):])} too (zero weights at first)"
    return ""


def _loss_words(leg: dict) -> str:
    """The loss of one stage leg: L1, plus the SSIM term where its settings gave one (legs before that setting had
    none), and where it was taken."""
    weight = (leg.get("settings") or {}).get("ssim_weight")
    parts = [f"L1 + {weight:g} x (1 - SSIM)" if weight else "", "after the hard data consistency"
             if leg.get("loss_after_dc") else ""]
    return ", loss " + ", ".join(p for p in parts if p) if any(parts) else ""


def _init_words(legs: list[dict]) -> str:
    """Where the last refiner leg started; a warm start from earlier stage-3 legs counts their steps too."""
    st, earlier = legs[-1], legs[:-1]
    if st.get("init") == "identity":
        return "the identity (fresh)"
    widened = _widening(legs)
    if not earlier:
        return f"the stage-2 refiner{widened}"
    words = []
    for leg in earlier:
        where = f" on {leg['device_name']}" if leg.get("device_name") else ""
        loss = _loss_words({"settings": leg.get("settings")})  # where earlier legs took it: not repeated
        words.append(f"{leg['steps']} steps, {leg['seconds']} s{where}{loss}")
    total = sum(leg["steps"] for leg in legs)
    return f"the refiner of earlier stage-3 runs ({'; then '.join(words)}; {total} steps in all){widened}"


def _legs_note(legs: list[dict]) -> str:
    if len(legs) < 2:
        return ""
    return (" (the refiner stage's last leg: `--model` names the folder the earlier legs, listed under Refiner, "
            "left; each leg is the same command with its own settings)")


def _flow_words(config: ModelConfig, bridge_legs: list[dict]) -> tuple[str, str]:
    """What the latent U-Net is (for "What it is") and, for a flow, its bridge-stage training line."""
    sched = config.scheduler
    if sched is None or sched.start == "noise" or not bridge_legs:
        return ("a MONAI DiffusionModelUNet conditioned by concatenation on the encoded naive\ninverse (with noise "
                "augmentation, level as an input channel), sampled with DDIM"), ""
    guide, bs = sched.start, bridge_legs[-1]
    what = (f"a MONAI DiffusionModelUNet trained as a flow (MONAI RFlowScheduler, Euler steps)\nfrom the latent of the "
            f"{guide} image plus {sched.start_noise:g} x Gaussian noise to the truth's latent, conditioned on\nthat "
            f"latent: different noise, different samples, which spread where the measurement leaves the answer open")
    bank = bs["bank"]
    line = (f"\n- Flow U-Net (`medldm train bank`, then `medldm train bridge`): {bs['steps']} steps, {bs['seconds']} s, batch "
            f"{bs['settings']['batch_size']}, lr {bs['settings']['lr']:g}, from the "
            f"{'stage-2 U-Net' if bs['settings']['init'] == 'model' else 'a new U-Net'}, on a bank of {bs['bank_pairs']} "
            f"(truth, {guide}) latent pairs ({bank['batches']} batches of the bank's stream, seed {bank['seed']}, "
            f"{bank['seconds']} s to build on {bank.get('device_name', 'an unrecorded machine')}); held-out bank pairs, "
            f"latent MSE: one sample {bs['validation']['sample_mse']:.3f}, mean of two "
            f"{bs['validation']['mean2_mse']:.3f}, the {guide} start {bs['validation']['start_mse']:.3f}; on "
            f"{bs['device_name']}.")
    return what, line


def stored(folder, file_name: str):
    """A JSON file a shipped model folder keeps beside its weights (ROWS_FILE, NOISE_FILE, SPEED_FILE,
    MULTICOIL_FILE), or None when it has none."""
    path = Path(folder) / file_name
    return json.loads(path.read_text()) if path.is_file() else None


NOISE_FILE = "noise_estimate.json"  # benchmarks/noise_estimate.py --json: a card's noise-level section


def noise_section(noise: dict | None) -> str:
    """The measured accuracy of the noise-level estimate (``benchmarks/noise_estimate.py --json``), per volume
    and variant: the worst relative error over the levels and seeds."""
    if not noise:
        return ""
    worst: dict[tuple[str, str], list[float]] = {}
    for r in noise["rows"]:
        worst.setdefault((r["volume"], r["variant"]), []).append(r["worst_error"])
    levels = sorted({r["sigma_over_max"] for r in noise["rows"]})
    lines = [f"| {v} | {k} | {100 * max(e):.1f}% |" for (v, k), e in worst.items()]
    return f"""
## Noise level
Without a given `sigma`, it is estimated from the input (`medldm.physics.noise.rician_sigma_estimate`: a fit to
the air's Rayleigh law, else a foreground MAD); provenance records the estimate and how it was made. Worst
relative error over sigma = {', '.join(f'{100 * lv:g}' for lv in levels)}% of the max and {noise['seeds']} seeds:

| volume | input | worst error |
|---|---|---|
""" + "\n".join(lines) + f"""

Reproduce: `{noise['command']}`.
"""


SPEED_FILE = "speed.json"  # benchmarks/profile_inference.py --json rows of this model: whole-volume seconds


def speed_line(rows: list[dict] | None) -> str:
    """Seconds per whole volume at the model's defaults, from the profile's rows (one per number of samples)."""
    if not rows:
        return "Seconds per whole volume: `benchmarks/README.md`."
    rows = sorted(rows, key=lambda r: r["samples"])
    r0 = rows[0]
    each = ", ".join(f"{r['total']:.0f} s for {r['samples']} sample{'s' * (r['samples'] > 1)} (peak RSS "
                     f"{r['peak_rss_gib']:.1f} GiB)" for r in rows)
    latent = f"U-Net and VAE in {r0['latent_runtime']}, " if r0.get("latent_runtime") else ""
    if latent.endswith("bf16, "):  # the figure holds on such CPUs only (2-3x longer without bfloat16 instructions)
        latent = f"bfloat16 instructions, {latent}"
    return (f"Seconds per whole {r0['shape']} volume at the defaults ({r0['device'].upper()}, {r0['threads']} "
            f"threads, {latent}refiner in {r0['refiner_runtime']}, measured {r0['measured']}): {each} "
            "(`python benchmarks/profile_inference.py`; stages in `benchmarks/README.md`).")


MULTICOIL_FILE = "multicoil.json"  # benchmarks/multicoil_recon.py --json: a recon card's multi-coil section


def multicoil_section(multicoil: dict | None) -> str:
    """The model on simulated multi-coil k-space against the parallel-imaging baselines, from
    ``benchmarks/multicoil_recon.py --json`` (its rows already narrowed to one model and the baselines)."""
    if not multicoil:
        return ""
    table = "\n".join(f"| {r['case']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['seconds']:.0f} |"
                      for r in multicoil["rows"])
    return f"""
## Multi-coil k-space
The held-out volumes' {multicoil['slices']} middle slices at their full plane made into multi-coil k-space (birdcage
coil maps, a smooth random image phase, equispaced masks with fastMRI's centre fractions), then read as a file
is: coil maps and phase estimated from the centre lines, then fitted to every measured line (`medldm.physics.coils`;
measured {multicoil['measured']}, seconds on 2 CPU cores). Cases ending in `-noiseF` add complex Gaussian noise of std F
times the slab's 99.5th percentile to every measured sample; the others are noise-free. A case that is missing was
refused when read (too few centre lines to estimate coil maps from).

| case | method | PSNR | SSIM | seconds |
|---|---|---|---|---|
{table}

Reproduce: `{multicoil['command']}`.
"""


def model_card(config: ModelConfig, record: TrainingRecord, rows: list[dict], command: str, machine: str,
               noise: dict | None = None, speed: list[dict] | None = None, multicoil: dict | None = None) -> str:
    t = record.training
    refiner_legs, bridge_legs = record.stage_legs("refiner"), record.stage_legs("bridge")
    flow_what, flow_line = _flow_words(config, bridge_legs)  # a flow U-Net replaces stage 2's weights
    weights_line = flow_line or (f"\n- Diffusion U-Net weights: {t['unet_weights']}." if t.get("unet_weights") else "")
    if refiner_legs:  # medldm.training.refiner: the shipped refiner comes from stage 3, not from stage 2
        st = refiner_legs[-1]
        through_dc = _loss_words(st)
        passes = st.get("cascades", 1)
        cascade = f", {passes} passes with data consistency between them" if passes > 1 else ""
        if st.get("guide", "naive") != "naive":
            cascade += _guide_words(st["guide"], config.refiner is not None and config.refiner.residual_on == "naive")
        ran_on = f"; stage run on {st['device_name']}" if st.get("device_name") else ""
        sampler = "flow" if config.scheduler is not None and config.scheduler.start != "noise" else "DDIM"
        weights_line += (f"\n- Refiner: retrained in stage 3 (`medldm train refiner`) on {st['sample_steps']}-step {sampler} "
                         f"samples of the frozen U-Net, {st['steps']} steps, {st['seconds']} s, patches "
                         f"{st['patch_size']}, batch {st['batch_size']}, augmentation {'on' if st['augment'] else 'off'}, "
                         f"initialised as {_init_words(refiner_legs)}{through_dc}{cascade}{ran_on}.")
    vae_t = t.get("vae_training") or {}
    deg = config.degradation.model_dump() if config.degradation else {}
    norm = config.normalisation.model_dump(exclude={"latent_fit_on"})
    latent_line = ("" if config.normalisation.latent_fit_on == "input" else
                   f" The latent path sees the input at the percentile of its {config.normalisation_reference} image "
                   "(an estimate of the clean one, which the VAE was trained at; noise lifts the input's) and its "
                   "decode is scaled back (`normalisation.latent_fit_on`).")
    return f"""# Model card: `{config.name}`

**Task:** {config.task} · **modality:** {config.modality} · **format:** {config.format} ·
**medldm:** {config.medldm_version} · weights stored as {config.weights_dtype} safetensors.

## What it is
A 2D latent diffusion model applied slice-wise (slice axis {config.slice_axis}): a MONAI AutoencoderKL
(channels {config.vae.channels}, {config.vae.latent_channels} latent channels, latent scale
{config.latent_scale:.4g}), {flow_what}, then a pixel-space refiner
(MONAI BasicUNet) that sees the decoded estimate and the naive inverse (or the guide named below), then hard data consistency
(recon, SR). Intensity normalisation: `{norm}`.{latent_line}

Trained degradation: `{deg}`.

Default sampling: {config.default_steps} step(s) (`steps=None`), the fewest that measured as well as 10 or 20 on the
held-out cases (`python benchmarks/steps_quality.py`); the validation table below was made with 10 steps and 2
samples (`medldm evaluate --steps 10 --samples 2`). {speed_line(speed)}
{_default_path(config)}

## Training
- Data: `medldm data prepare` (MNI152 2009a T1 outside the held-out slab, 20 synthetic subjects drawn from
  the MNI152 tissue maps with the same hold-out, and for CT the InVesalius head CT below its top 32 slices);
  see `data_cards/`.
- VAE: {vae_t.get('steps')} steps, {vae_t.get('seconds')} s; diffusion U-Net + refiner: {t.get('steps')} steps,
  {t.get('seconds')} s, on {machine}.{weights_line}
- Reproduce: `{command}`{_legs_note(refiner_legs)}

## Verdict
{verdict(rows)}

## Validation (held-out data, fastMRI metric conventions; see medldm/evaluation/metrics.py)
{markdown_table(rows)}
`VAE(truth)` is the VAE's own reconstruction of the ground truth: the ceiling of any latent-only output.
`supervised U-Net` is a MONAI BasicUNet of the refiner's size trained on the same data and degradations
(`pipelines/train_supervised_baselines.py`; its budget is in `medldm/shipped/supervised/<name>/model.json`).
{noise_section(noise)}{multicoil_section(multicoil)}
## Intended use and limits
Research only: not a medical device, not for diagnosis. Trained on a population-average template, synthetic
subjects and (CT) one real head: expect failures on pathology, other anatomy, other contrasts and
scanners, implants, motion, and on intensity ranges far from training. Outputs can look plausible and be
wrong; read the uncertainty map and the data-consistency residual, and compare with the input.
"""
