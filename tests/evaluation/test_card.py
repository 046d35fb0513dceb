from medldm.evaluation import card as cards
from medldm.evaluation.card import results_table, verdict
from medldm.models.model_config import parse_model_files


def model_card(meta: dict, rows: list[dict], command: str, machine: str) -> str:
    """The card of a format-1 model.json (its legs nested under "continued", as the cases below are written),
    completed to a valid model and converted as loading converts it."""
    full = {"format": "medldm-model/1", "name": "m", "kind": "ldm", "task": "recon", "modality": "MR",
            "spatial_dims": 2, "patch_size": [96, 96], "normalisation": {"kind": "percentile"}, "unet": {},
            "scheduler": {}, "refiner": {}, "degradation": {"task": "recon"}, **meta}
    return cards.model_card(*parse_model_files(full, None, "test"), rows, command, machine)


def _rows(ours_psnr, ours_ssim):
    case = "vol/4x"
    return [{"case": case, "method": "zero-filled", "psnr": 24.0, "ssim": 0.75},
            {"case": case, "method": "TV-POCS", "psnr": 27.7, "ssim": 0.85},
            {"case": case, "method": "supervised U-Net", "psnr": 26.0, "ssim": 0.80},
            {"case": case, "method": "VAE(truth)", "psnr": 28.3, "ssim": 0.95},
            {"case": case, "method": "medldm (default)", "psnr": ours_psnr, "ssim": ours_ssim}]


def test_bold_only_where_every_classical_baseline_is_beaten_on_both_metrics():
    both = results_table({"m": _rows(28.0, 0.86)}).splitlines()[-1]
    psnr_only = results_table({"m": _rows(28.0, 0.84)}).splitlines()[-1]
    assert both == "| [m](data_cards/model-m.md) | vol/4x | TV-POCS 27.70 / 0.850 | 26.00 / 0.800 | **28.00 / 0.860** |"
    assert "**" not in psnr_only and "28.00 / 0.840" in psnr_only
    # the best baseline is the best classical one: never the supervised U-Net or the VAE ceiling
    assert "beats the best classical baseline (TV-POCS" in verdict(_rows(28.0, 0.86))
    assert "does NOT beat" in verdict(_rows(28.0, 0.84))
    # a margin below the third decimal is printed with a fourth, not as a tie
    close = _rows(28.0, 0.8504)
    assert "SSIM 0.8504 beats the best classical baseline (TV-POCS: 27.70 dB / 0.8500)" in verdict(close)
    assert "| TV-POCS 27.70 / 0.8500 | 26.00 / 0.800 | **28.00 / 0.8504** |" in results_table({"m": close})


def test_the_card_says_where_a_refiner_stage_started_and_ran():
    stage = {"sample_steps": 5, "steps": 139, "seconds": 216.8, "patch_size": [96, 96], "batch_size": 8,
             "augment": True, "init": "model", "device_name": "NVIDIA H100",
             "continued": {"steps": 486, "seconds": 1200.7, "init": "identity", "device_name": "x86_64 CPU"}}
    meta = {"name": "m", "vae": {"channels": [32, 64], "latent_channels": 4}, "latent_scale": 1.0,
            "refiner_stage": stage}
    card = model_card(meta, _rows(28.0, 0.86), "cmd", "machine")
    assert "earlier stage-3 runs (486 steps, 1200.7 s on x86_64 CPU; 625 steps in all)" in card
    twice = {**stage, "steps": 900, "continued": {**stage, "device_name": "NVIDIA H100"}}
    assert ("(486 steps, 1200.7 s on x86_64 CPU; then 139 steps, 216.8 s on NVIDIA H100; 1525 steps in all)"
            in model_card({**meta, "refiner_stage": twice}, [], "cmd", "m"))
    assert "stage run on NVIDIA H100" in card and "the refiner stage's last leg" in card
    fresh = model_card({**meta, "refiner_stage": {**stage, "init": "identity", "continued": None}}, [], "cmd", "m")
    assert "initialised as the identity (fresh)" in fresh and "in all" not in fresh and "last leg" not in fresh


def test_the_card_names_a_two_image_guide_and_the_widened_warm_start():
    stage = {"sample_steps": 5, "steps": 500, "seconds": 3300.0, "patch_size": [96, 96], "batch_size": 8,
             "augment": True, "init": "model", "guide": "naive+tv-pocs"}
    meta = {"name": "m", "vae": {"channels": [32, 64], "latent_channels": 4}, "latent_scale": 1.0,
            "refiner": {"residual_on": "naive"}, "refiner_stage": stage}
    card = model_card(meta, [], "cmd", "m")
    assert "guided by the naive inverse and by TV-POCS" in card and "stacked as input channels" in card
    assert "adds its correction to the naive inverse" in card
    assert "the stage-2 refiner, its input widened to take tv-pocs too" in card
    fresh = model_card({**meta, "refiner_stage": {**stage, "init": "identity"}}, [], "cmd", "m")
    assert "identity (fresh)" in fresh and "widened" not in fresh
    again = {**stage, "continued": {**stage, "steps": 100, "seconds": 600.0}}  # the first leg widened it
    assert "600.0 s; 600 steps in all), its input widened to take tv-pocs" in model_card(
        {**meta, "refiner_stage": again}, [], "cmd", "m")
    same = {**stage, "continued": {**stage, "init": "identity"}}  # built with both channels: nothing widened
    assert "widened" not in model_card({**meta, "refiner_stage": same}, [], "cmd", "m")


def test_the_card_gives_each_leg_its_loss():
    plain = {"sample_steps": 5, "steps": 512, "seconds": 2402.8, "patch_size": [96, 96], "batch_size": 8,
             "augment": True, "init": "model", "loss_after_dc": True, "device_name": "x86_64 CPU"}
    mixed = {**plain, "steps": 543, "settings": {"ssim_weight": 0.2}, "continued": {**plain, "init": "identity"}}
    meta = {"name": "m", "vae": {"channels": [32, 64], "latent_channels": 4}, "latent_scale": 1.0}
    card = model_card({**meta, "refiner_stage": mixed}, [], "cmd", "m")
    assert "543 steps, 2402.8 s" in card and "loss L1 + 0.2 x (1 - SSIM), after the hard data consistency" in card
    assert "(512 steps, 2402.8 s on x86_64 CPU; 1055 steps in all)" in card  # the earlier leg: L1 alone
    later = {**mixed, "settings": {"ssim_weight": 0.5}, "continued": mixed}
    card = model_card({**meta, "refiner_stage": later}, [], "cmd", "m")
    assert "then 543 steps, 2402.8 s on x86_64 CPU, loss L1 + 0.2 x (1 - SSIM); 1598 steps in all" in card
    assert "loss L1 + 0.5 x (1 - SSIM), after the hard" in card
    assert "SSIM" not in model_card({**meta, "refiner_stage": plain}, [], "cmd", "m").split("## Verdict")[0]
    no_dc = {**mixed, "loss_after_dc": False, "continued": None}
    assert "initialised as the stage-2 refiner, loss L1 + 0.2 x (1 - SSIM); stage run on" in model_card(
        {**meta, "refiner_stage": no_dc}, [], "c", "m")


def test_the_noise_section_shows_the_worst_error_per_input():
    from medldm.evaluation.card import noise_section

    assert noise_section(None) == ""
    rows = [{"volume": "a.nii.gz", "variant": "as is", "sigma_over_max": lv, "mean_ratio": 1.0, "worst_error": e}
            for lv, e in ((0.01, 0.004), (0.15, 0.012))]
    rows.append({"volume": "a.nii.gz", "variant": "air zeroed", "sigma_over_max": 0.01, "mean_ratio": 2.1,
                 "worst_error": 1.1})
    text = noise_section({"command": "python benchmarks/noise_estimate.py --json x", "seeds": 2, "rows": rows})
    assert "| a.nii.gz | as is | 1.2% |" in text and "| a.nii.gz | air zeroed | 110.0% |" in text
    assert "sigma = 1, 15% of the max and 2 seeds" in text and "--json x" in text


def test_the_card_states_whole_volume_seconds_from_the_profile_rows(tmp_path):
    import json
    import os

    from tests.helpers import load_script

    assert cards.speed_line(None) == "Seconds per whole volume: `benchmarks/README.md`."
    row = {"model": "mr-x", "shape": "181x217x181", "samples": 1, "device": "cpu", "threads": 2, "steps": 1,
           "refiner_runtime": "openvino 2026.4.1", "total": 62.8, "peak_rss_gib": 2.02}
    first, later = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps([row, {**row, "samples": 4, "total": 250.5}, {**row, "model": "other"}]))
    later.write_text(json.dumps([{**row, "total": 60.1, "measured": "2026-12-08"}]))
    os.utime(first, (0, 86400 * 365))  # 1971-01-01: the day a row without its own date is given
    speed = load_script("pipelines", "write_model_cards").given_speed("mr-x", [first, later])
    assert [(r["samples"], r["total"], r["measured"]) for r in speed] == [(1, 60.1, "2026-12-08"),
                                                                         (4, 250.5, "1971-01-01")]
    line = cards.speed_line(speed)
    assert "181x217x181 volume" in line and "60 s for 1 sample (peak RSS 2.0 GiB)" in line
    assert "250 s for 4 samples" in line and "refiner in openvino 2026.4.1" in line and "U-Net" not in line
    bf16 = cards.speed_line([{**speed[0], "latent_runtime": "openvino 2026.4.1 bf16"}])
    assert "threads, bfloat16 instructions, U-Net and VAE in openvino 2026.4.1 bf16, refiner in" in bf16
    assert load_script("pipelines", "write_model_cards").given_speed("absent", [first]) is None


def test_the_multicoil_section_shows_the_models_and_the_baselines_rows_only(tmp_path):
    import json

    from medldm.evaluation.card import multicoil_section
    from tests.helpers import load_script

    base = {"case": "slab/8coil-4x", "ssim": 0.9, "seconds": 8.0}
    rows = [{**base, "model": "-", "method": "CG-SENSE", "psnr": 31.0},
            {**base, "model": "mr-recon", "method": "medldm (default)", "psnr": 34.2},
            {**base, "model": "runs/other", "method": "medldm (default)", "psnr": 99.0}]
    path = tmp_path / "mc.json"
    path.write_text(json.dumps({"command": "python benchmarks/multicoil_recon.py", "measured": "2026-12-07",
                                "slices": 8, "rows": rows}))
    noisy = tmp_path / "mc-noise.json"  # a second run (with noise) joins the first: rows, commands, latest day
    noisy_rows = [{**r, "case": "slab/8coil-4x-noise0.005"} for r in rows]
    noisy.write_text(json.dumps({"command": "python benchmarks/multicoil_recon.py --noise 0.005",
                                 "measured": "2026-12-08", "slices": 8, "rows": noisy_rows}))
    given = load_script("pipelines", "write_model_cards").given_multicoil
    mine = given("mr-recon", [path])
    assert [r["method"] for r in mine["rows"]] == ["CG-SENSE", "medldm (default)"]
    assert given("mr-sr", [path]) is None and given("mr-recon", None) is None
    text = multicoil_section(mine)
    assert "| slab/8coil-4x | CG-SENSE | 31.00 | 0.900 | 8 |" in text
    assert "| slab/8coil-4x | medldm (default) | 34.20 | 0.900 | 8 |" in text and "99.00" not in text
    assert "8 middle slices" in text and "Reproduce: `python benchmarks/multicoil_recon.py`" in text
    both = given("mr-recon", [path, noisy])
    assert [r["case"] for r in both["rows"]] == ["slab/8coil-4x"] * 2 + ["slab/8coil-4x-noise0.005"] * 2
    assert both["measured"] == "2026-12-08" and both["command"] == ("python benchmarks/multicoil_recon.py && python "
                                                                     "benchmarks/multicoil_recon.py --noise 0.005")
    assert multicoil_section(None) == ""
