"""The workflow scripts' own logic (their training runs are exercised through the library's tests)."""

import json
from pathlib import Path

import pytest

from medldm.config import load_config
from medldm.models.model_config import TrainingRecord
from tests.helpers import load_script, make_tiny_bundle

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def train_default_models():
    return load_script("pipelines", "train_default_models")


def test_a_finished_refiner_stage_is_reused_only_with_the_settings_asked_for(train_default_models):
    """Stages saved before their settings were recorded compare by what they did record; settings added
    since count at their default (how those stages ran); any difference means the stage is redone."""
    settings_of = train_default_models._stage_settings
    cfg = load_config(ROOT / "configs" / "ldm-mr-sr-cpu.yaml", "ldm")
    legacy = {"minutes_budget": cfg.refiner_stage.max_minutes, "sample_steps": cfg.refiner_stage.sample_steps,
              "lr": cfg.refiner_stage.lr, "augment": True, "init": "identity", "patch_size": [96, 48]}
    asked = cfg.refiner_stage.model_dump()
    assert settings_of(legacy, cfg.data.patch_size) == asked
    assert settings_of(legacy, cfg.data.patch_size) != {**asked, "cascades": 2}
    assert settings_of({**legacy, "patch_size": list(cfg.data.patch_size)}, cfg.data.patch_size)["patch_size"] is None
    recorded = {"settings": {k: v for k, v in asked.items() if k != "cascades"}}  # saved before cascades existed
    assert settings_of(recorded, cfg.data.patch_size) == asked
    assert settings_of(recorded, cfg.data.patch_size) != {**asked, "max_minutes": 25.0}


def test_a_refiner_stage_is_redone_when_its_u_net_trained_on(train_default_models, tmp_path):
    """model-raw is rewritten in place when its LDM run resumes with more steps: a stage made from the
    earlier U-Net must not be reused; stages saved before the U-Net's steps were recorded count as current."""
    (tmp_path / "training.json").write_text('{"training": {"steps": 4000}}')
    assert train_default_models._same_unet({"source_unet_steps": 4000}, tmp_path)
    assert not train_default_models._same_unet({"source_unet_steps": 800}, tmp_path)
    assert train_default_models._same_unet({}, tmp_path)


def test_refiner_stage_redoes_a_stage_made_from_an_earlier_u_net(train_default_models, tmp_path, monkeypatch):
    """The wiring, not just the helper: with --skip-train, a finished stage of the same folder and settings is
    reused while its U-Net is the one there, and removed and retrained once that U-Net has trained on."""
    import json

    import medldm.training.refiner as refiner_module

    cfg = load_config(ROOT / "configs" / "ldm-mr-recon-cpu.yaml", "ldm")
    model_dir, run_dir = tmp_path / "model-raw", tmp_path
    (run_dir / "refined" / "model").mkdir(parents=True)
    model_dir.mkdir()
    (model_dir / "training.json").write_text(json.dumps({"training": {"steps": 800}}))
    made = {"stage": "refiner", "settings": cfg.refiner_stage.model_dump(), "source_model": str(model_dir),
            "source_unet_steps": 800}
    (run_dir / "refined" / "model" / "model.json").write_text("{}")  # the record is what the pipeline reads
    (run_dir / "refined" / "model" / "training.json").write_text(json.dumps({"legs": [made]}))
    calls = []
    monkeypatch.setattr(refiner_module, "train_refiner", lambda *a, **k: calls.append(a))

    train_default_models.refiner_stage(cfg, model_dir, run_dir, retrain=False)
    assert calls == [] and (run_dir / "refined" / "model").is_dir()
    (model_dir / "training.json").write_text(json.dumps({"training": {"steps": 4000}}))
    train_default_models.refiner_stage(cfg, model_dir, run_dir, retrain=False)
    assert len(calls) == 1 and not (run_dir / "refined").exists()


def test_a_stage_recorded_with_a_relative_path_is_the_same_folder(train_default_models, tmp_path):
    """`medldm train refiner --model runs/...` records the path as typed; the pipeline passes absolute ones."""
    same = train_default_models._same_folder
    model_dir = train_default_models.ROOT / "runs" / "ldm-mr-recon" / "model-raw"
    assert same("runs/ldm-mr-recon/model-raw", model_dir) and same(str(model_dir), model_dir)
    assert not same("runs/ldm-mr-recon/model", model_dir) and not same(str(tmp_path / "model-raw"), model_dir)


def test_install_stage_takes_one_model_and_only_a_refiner_stage_of_it(train_default_models, tmp_path, monkeypatch):
    installed = []
    monkeypatch.setattr(train_default_models, "install", lambda name, folder, *a, **k: installed.append((name, folder, k)))
    with pytest.raises(SystemExit):
        train_default_models.main(["--only", "mr-denoise", "mr-recon", "--install-stage", str(tmp_path)])
    with pytest.raises(SystemExit):  # no model.json
        train_default_models.main(["--only", "mr-denoise", "--install-stage", str(tmp_path)])
    make_tiny_bundle(tmp_path, "recon", "MR")
    config = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**config, "name": "mr-recon"}))
    (tmp_path / "training.json").write_text(json.dumps({"legs": [{"stage": "refiner", "steps": 3, "source_model": "x"}]}))
    with pytest.raises(SystemExit):  # another model's stage
        train_default_models.main(["--only", "mr-denoise", "--install-stage", str(tmp_path)])
    assert installed == []
    train_default_models.main(["--only", "mr-recon", "--install-stage", str(tmp_path)])
    ((name, folder, kwargs),) = installed
    assert name == "mr-recon" and folder == tmp_path and "--install-stage OUT/model" in kwargs["command"]


def test_the_stage_command_sets_every_recorded_setting(train_default_models):
    import re

    from medldm.cli import _load_run_config
    from medldm.config import RefinerStageConfig

    settings = {**RefinerStageConfig().model_dump(), "enabled": True, "guide": "nlm", "patch_size": [96, 48],
                "max_minutes": 3.6, "lr": 1e-5, "num_workers": 14}
    leg = {"stage": "refiner", "settings": settings, "device_name": "NVIDIA H100",
           "source_model": str(train_default_models.ROOT / "medldm" / "shipped" / "mr-sr")}
    record = TrainingRecord(training={"unet_weights": "raw weights at the last step"}, legs=[leg])
    gpu = train_default_models.stage_command("mr-sr", record)
    sets = re.findall(r"--set (refiner_stage\.\w+=\S+)", gpu)
    config = _load_run_config("ldm", train_default_models.ROOT / "configs" / "ldm-mr-sr-cpu.yaml", sets)
    assert config.refiner_stage.model_dump() == settings  # read back as the CLI reads --set
    assert "--device cuda" in gpu and "--model medldm/shipped/mr-sr " in gpu and "#" not in gpu
    assert gpu.startswith("python pipelines/train_default_models.py --only mr-sr --unet-weights raw && ")
    leg = record.legs[-1]  # the record holds its own copy
    leg["device_name"], record.training = "x86_64 CPU, 2 threads", {}
    cpu = train_default_models.stage_command("mr-sr", record)
    assert "cuda" not in cpu and "--unet-weights" not in cpu
    del leg["source_model"]
    with pytest.raises(SystemExit, match="started from"):
        train_default_models.stage_command("mr-sr", record)


def test_cards_keep_the_rows_they_were_written_from(tmp_path, monkeypatch, capsys):
    """A later run without --rows (say, after a template change) must not drop the FID rows a card was given."""
    import json
    import shutil

    import medldm.sampling.reconstructor as reconstructor
    from medldm.evaluation.evaluate import markdown_table

    cards = load_script("pipelines", "write_model_cards")
    shipped = tmp_path / "shipped"
    (shipped / "ct-recon").mkdir(parents=True)
    (tmp_path / "data_cards").mkdir()
    prose = "# Evaluation\n\n| model | an earlier table |\n|---|---|\n\nHow the rows were made.\n"
    evaluation_md = tmp_path / "data_cards" / "evaluation.md"
    evaluation_md.write_text(prose + "\n| model |\n|---|\n| old |\n")
    for name in ("model.json", "training.json"):
        shutil.copy(ROOT / "medldm" / "shipped" / "ct-recon" / name, shipped / "ct-recon")
    for module in (cards, reconstructor):
        monkeypatch.setattr(module, "SHIPPED_DIR", shipped)
    monkeypatch.setattr(cards, "ROOT", tmp_path)
    case = "slab/60 views"
    rows = [{"model": "ct-recon", "case": case, "method": "FBP", "psnr": 25.0, "ssim": 0.80},
            {"model": "ct-recon", "case": case, "method": "medldm (default)", "psnr": 30.0, "ssim": 0.90},
            {"model": "ct-recon", "case": "all cases", "method": "FBP", "fid": 90.0},
            {"model": "ct-recon", "case": "all cases", "method": "medldm (default)", "fid": 60.0}]
    given = tmp_path / "fid-run"
    given.mkdir()
    (given / "ct-recon.json").write_text(json.dumps(rows))
    stored = shipped / "ct-recon" / "evaluation.json"

    cards.main([])  # nothing stored yet: card and table are left alone, not written without rows
    assert not (shipped / "ct-recon" / "README.md").exists()
    assert evaluation_md.read_text().endswith("| old |\n")
    cards.main(["--rows", str(given)])
    card = (shipped / "ct-recon" / "README.md").read_text()
    assert "FID (all cases, 3 planes, lower is better): medldm (default) 60.0, FBP 90.0" in card
    assert (tmp_path / "data_cards" / "model-ct-recon.md").read_text() == card
    assert json.loads(stored.read_text()) == rows
    assert evaluation_md.read_text() == prose + "\n" + markdown_table(rows)  # only the last table replaced

    (shipped / "ct-recon" / "README.md").unlink()
    cards.main([])  # rebuilt from the stored rows alone
    assert (shipped / "ct-recon" / "README.md").read_text() == card
    capsys.readouterr()
    cards.main(["--readme-table"])
    assert ("| [ct-recon](data_cards/model-ct-recon.md) | slab/60 views | FBP 25.00 / 0.800 | - | **30.00 / 0.900** |\n"
            in capsys.readouterr().out)

    (given / "ct-recon.json").write_text(json.dumps(rows[:1] + rows[2:]))
    cards.main(["--rows", str(given), "--readme-table"])  # prints the given rows, stores nothing
    assert "ct-recon" not in capsys.readouterr().out.splitlines()[-1]
    assert json.loads(stored.read_text()) == rows
    cards.main(["--rows", str(given)])  # rows replaced whole, and the ones dropped are named
    assert "lack 1 stored ones (slab/60 views: medldm (default))" in capsys.readouterr().out
    assert json.loads(stored.read_text()) == rows[:1] + rows[2:]

    empty = tmp_path / "other-run"
    empty.mkdir()
    cards.main(["--rows", str(empty)])  # a run without this model's rows keeps its stored ones
    assert json.loads(stored.read_text()) == rows[:1] + rows[2:]
    (empty / "ct-recon.json").write_text(json.dumps([{**rows[0], "model": "ct-sr"}]))
    with pytest.raises(SystemExit, match="not of ct-recon"):
        cards.main(["--rows", str(empty)])
    with pytest.raises(SystemExit, match="not a folder"):
        cards.main(["--rows", str(tmp_path / "missing")])


@pytest.mark.slow
def test_the_gpu_script_rehearses_on_cpu_and_brings_back_a_model_that_loads(tiny_datalist, tmp_path):
    """pipelines/bridge_gpu.sh is run at once, untried, when a session is lent a GPU: its whole path (VAE leg, bank,
    flow, refiner, the tar that comes back) runs here on CPU at tiny budgets, so a broken stage shows up now."""
    import os
    import subprocess
    import sys
    import tarfile

    from medldm.sampling.reconstructor import Reconstructor

    env = {**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, "DATALIST": str(tiny_datalist)}
    done = subprocess.run(["bash", str(ROOT / "pipelines" / "bridge_gpu.sh"), str(tmp_path / "out"), "mr-recon",
                           "2", "0.05", "0.05", "0", "0.05"], env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]
    with tarfile.open(tmp_path / "out" / "mr-recon.tar") as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path / "back", filter="data")
    assert {"refiner/model/model.json", "refiner/model/unet.safetensors", "refiner/model/refiner.safetensors",
            "refiner/bank_recipe.json", "refiner/bridge_history.json", "refiner/losses.json"} <= names
    rec = Reconstructor.load(tmp_path / "back" / "refiner" / "model", device="cpu")
    assert rec.task == "recon" and rec.bundle.flow_start != "noise"  # the flow from the guide, not from noise
