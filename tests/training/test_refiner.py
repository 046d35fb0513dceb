import mlflow
import pytest
import torch

from medldm.config import load_config
from medldm.models.bundle import load_bundle
from medldm.training.ldm import train_ldm
from medldm.training.refiner import train_refiner
from medldm.training.vae import train_vae
from tests.training.test_train_ldm import CONFIGS


@pytest.fixture(scope="module")
def tiny_ldm(tiny_datalist, tmp_path_factory):
    over = {"data.datalist": str(tiny_datalist), "tracking.enabled": False}
    vae = train_vae(load_config(CONFIGS / "vae-mr-tiny.yaml", "vae", over), tmp_path_factory.mktemp("vae"))
    cfg = load_config(CONFIGS / "ldm-mr-denoise-tiny.yaml", "ldm", {**over, "vae_path": str(vae)})
    return cfg, train_ldm(cfg, tmp_path_factory.mktemp("ldm"))


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.slow  # the stage end to end with MLflow logging (~7 s); the quick tier keeps its parts below
def test_only_the_refiner_changes_and_the_run_is_logged(tiny_ldm, mlflow_tmp, tmp_path):
    cfg, model = tiny_ldm
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": True})})
    before = load_bundle(model)
    after = load_bundle(train_refiner(cfg, model, tmp_path / "refined", max_steps=3))
    for name in ("vae", "unet"):
        for k, v in getattr(before, name).state_dict().items():
            torch.testing.assert_close(getattr(after, name).state_dict()[k], v, rtol=0, atol=0)
    # init "identity": a fresh refiner whose last layer starts at zero, and three Adam steps move it
    assert cfg.refiner_stage.init == "identity"
    untrained = load_bundle(train_refiner(cfg, model, tmp_path / "zero", max_steps=0)).refiner
    assert not untrained.final_conv.weight.any() and after.refiner.final_conv.weight.abs().sum() > 0
    stage = after.record.stage_legs("refiner")[-1]
    assert stage["steps"] == 3 and stage["sample_steps"] == cfg.refiner_stage.sample_steps
    run = mlflow.get_run(stage["mlflow_run_id"])
    assert "train/refiner_l1" in run.data.metrics and run.data.tags["medldm.stage"] == "refiner"
    # every stage setting is a param, the effective data settings (the stage's or the run's) among them
    assert {k: run.data.params[k] for k in ("stream_offset", "ssim_weight", "guide", "patch_size")} == {
        "stream_offset": "0", "ssim_weight": "0.0", "guide": cfg.refiner_stage.guide,
        "patch_size": str(cfg.refiner_stage.patch_size or cfg.data.patch_size)}


@pytest.mark.slow
def test_resume_ends_where_one_run_ends(tiny_ldm, tmp_path):
    cfg, model = tiny_ldm
    straight = load_bundle(train_refiner(cfg, model, tmp_path / "straight", max_steps=3)).refiner
    train_refiner(cfg, model, tmp_path / "legs", max_steps=2)
    resumed = load_bundle(train_refiner(cfg, model, tmp_path / "legs", max_steps=3, resume=True))
    assert resumed.record.stage_legs("refiner")[-1]["steps"] == 3
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.refiner.state_dict()[k], v, rtol=0, atol=0)


def test_a_model_without_refiner_is_refused(tiny_ldm, tmp_path):
    from medldm.errors import ModelError
    from medldm.models.bundle import save_bundle

    cfg, model = tiny_ldm
    bare = load_bundle(model)
    bare.refiner = None
    bare.config.refiner.enabled = False
    save_bundle(bare, tmp_path / "bare")
    with pytest.raises(ModelError, match="refiner"):
        train_refiner(cfg, tmp_path / "bare", tmp_path / "out", max_steps=1)


def test_stage_data_takes_the_stage_patches_and_checks_them(tiny_ldm):
    from pydantic import ValidationError

    from medldm.training.refiner import stage_data

    cfg, _ = tiny_ldm
    stage = cfg.refiner_stage.model_copy(update={"patch_size": [32, 16]})
    data = stage_data(cfg.model_copy(update={"refiner_stage": stage}))
    assert data.patch_size == [32, 16] and data.augment and data.datalist == cfg.data.datalist
    bad = cfg.model_copy(update={"refiner_stage": cfg.refiner_stage.model_copy(update={"patch_size": [32]})})
    with pytest.raises(ValidationError, match="patch_size"):
        stage_data(bad)


@pytest.mark.parametrize("task", ["recon", "sr"])
def test_consistent_explains_the_measurement_and_passes_gradients_only_off_it(task):
    """The loss after DC may only teach the refiner what the measurement does not fix: its gradient lies in
    the null space of A (A applied to it is ~0), and the projected patches reproduce y."""
    from medldm.models.normalisation import Normalisation
    from medldm.physics import build_random_operator
    from medldm.training.ldm import degrade_batch
    from medldm.training.refiner import consistent

    kw = {"recon": {}, "sr": {"factors": [4]}}[task]
    norm = Normalisation(kind="percentile", scale=2.0)
    truth = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    _, ops, ys = degrade_batch(truth, build_random_operator(task, "MR", **kw), norm, [3, 4])
    est = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = consistent(est, ops, ys, norm)
    for i, (op, y) in enumerate(zip(ops, ys)):
        assert op.residual(norm.inverse(out[i:i + 1].detach()), y) < 1e-4
    target = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((out - target).abs().mean(), est)
    for i, op in enumerate(ops):
        g = grad[i:i + 1]
        assert g.abs().sum() > 0
        assert torch.linalg.vector_norm(op.A(g)) < 1e-4 * torch.linalg.vector_norm(g) * g.numel() ** 0.5


def test_ct_patches_of_one_geometry_share_a_projection_that_equals_their_own():
    """Grouping by ``dc_group`` (one data-consistency call per CT geometry) changes nothing but the speed:
    each patch ends as its own operator's projection makes it, gradients included; dose does not split groups."""
    from medldm.models.normalisation import Normalisation
    from medldm.physics import build_random_operator
    from medldm.training.ldm import degrade_batch
    from medldm.training.refiner import consistent

    norm = Normalisation.for_modality("CT")
    truth = torch.rand(5, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    rop = build_random_operator("recon", "CT", views=[20, 30], I0_range=[1e4, 1e6])
    _, ops, ys = degrade_batch(truth, rop, norm, [1, 2, 3, 4, 5])
    assert len({op.views for op in ops}) == 2 and len({op.dc_group() for op in ops}) == 2
    assert len({op.I0 for op in ops}) == 5
    est = torch.rand(5, 1, 24, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
    together = consistent(est, ops, ys, norm)
    alone = torch.cat([consistent(est[i:i + 1], [op], [y], norm) for i, (op, y) in enumerate(zip(ops, ys))])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    w = torch.rand(5, 1, 24, 24, generator=torch.Generator().manual_seed(2))
    (g1,) = torch.autograd.grad((together * w).sum(), est)
    (g2,) = torch.autograd.grad((alone * w).sum(), est)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


def test_loss_after_dc_is_recorded_and_only_where_inference_ends_with_dc(tiny_ldm, tmp_path):
    cfg, model = tiny_ldm
    stage = cfg.refiner_stage.model_copy(update={"loss_after_dc": True})
    denoise = load_bundle(train_refiner(cfg.model_copy(update={"refiner_stage": stage}), model, tmp_path / "d",
                                        max_steps=1))
    assert denoise.record.stage_legs("refiner")[-1]["loss_after_dc"] is False  # denoising has no DC at inference
    recon_cfg = cfg.model_copy(update={"refiner_stage": stage, "degradation": cfg.degradation.model_copy(
        update={"task": "recon", "kwargs": {"accelerations": [4], "center_fractions": [0.08]}})})
    recon = load_bundle(train_refiner(recon_cfg, model, tmp_path / "r", max_steps=2))
    assert recon.record.stage_legs("refiner")[-1]["loss_after_dc"] is True
    assert recon.record.stage_legs("refiner")[-1]["settings"]["loss_after_dc"] is True
    assert recon.refiner.final_conv.weight.abs().sum() > 0


def test_cascades_train_through_dc_and_are_refused_without_it(tiny_ldm, tmp_path):
    from medldm.errors import ConfigError

    cfg, model = tiny_ldm
    stage = cfg.refiner_stage.model_copy(update={"loss_after_dc": True, "cascades": 2})
    with pytest.raises(ConfigError, match="cascades"):  # denoising has no DC to put between the passes
        train_refiner(cfg.model_copy(update={"refiner_stage": stage}), model, tmp_path / "d", max_steps=1)
    recon_cfg = cfg.model_copy(update={"refiner_stage": stage, "degradation": cfg.degradation.model_copy(
        update={"task": "recon", "kwargs": {"accelerations": [4], "center_fractions": [0.08]}})})
    out = load_bundle(train_refiner(recon_cfg, model, tmp_path / "r", max_steps=2))
    assert out.refiner_cascades == 2 and out.record.stage_legs("refiner")[-1]["cascades"] == 2


@pytest.mark.slow
def test_guides_are_recorded_and_refused_where_they_cannot_run(tiny_ldm, tmp_path):
    from medldm.errors import ConfigError

    cfg, model = tiny_ldm
    stage = cfg.refiner_stage.model_copy(update={"guide": "tv-pocs"})
    with pytest.raises(ConfigError, match="guide.*tv-pocs projects"):  # denoising keeps no measurement
        train_refiner(cfg.model_copy(update={"refiner_stage": stage}), model, tmp_path / "d", max_steps=1)
    recon_cfg = cfg.model_copy(update={"refiner_stage": stage, "degradation": cfg.degradation.model_copy(
        update={"task": "recon", "kwargs": {"accelerations": [4], "center_fractions": [0.08]}})})
    out = load_bundle(train_refiner(recon_cfg, model, tmp_path / "r", max_steps=2))
    assert out.refiner_guide == "tv-pocs" and out.record.stage_legs("refiner")[-1]["settings"]["guide"] == "tv-pocs"
    assert out.refiner.final_conv.weight.abs().sum() > 0
    assert load_bundle(model).refiner_guide == "naive"
    nlm = cfg.refiner_stage.model_copy(update={"guide": "nlm"})
    with pytest.raises(ConfigError, match="nlm is set for Rician noise"):
        train_refiner(recon_cfg.model_copy(update={"refiner_stage": nlm}), model, tmp_path / "rn", max_steps=1)
    fitted = nlm.model_copy(update={"latent_fit_on": "guide"})
    denoised = load_bundle(train_refiner(cfg.model_copy(update={"refiner_stage": fitted}), model, tmp_path / "n",
                                         max_steps=1))
    assert denoised.refiner_guide == "nlm" and denoised.refiner.final_conv.weight.abs().sum() > 0
    assert denoised.config.normalisation.latent_fit_on == "guide"
    # a naive guide leaves the guide-fitted latent path nothing to fit on: refused before any step, not at the save
    back = cfg.refiner_stage.model_copy(update={"guide": "naive"})
    with pytest.raises(ConfigError, match="latent_fit_on 'guide' needs"):
        train_refiner(cfg.model_copy(update={"refiner_stage": back}), tmp_path / "n" / "model", tmp_path / "b",
                      max_steps=1)
    assert not (tmp_path / "b" / "model").exists()


@pytest.mark.slow
def test_a_warm_start_given_a_second_guide_image_starts_as_the_model_it_continues(tiny_ldm, tmp_path):
    """init: model with guide naive+tv-pocs widens the refiner's input; the added channel starts unused, so
    the saved (reloadable) refiner computes what the model's did, whatever TV-POCS image it is given."""
    from medldm.errors import ConfigError

    cfg, model = tiny_ldm
    stage = cfg.refiner_stage.model_copy(update={"guide": "naive+tv-pocs", "init": "model"})
    recon_cfg = cfg.model_copy(update={"refiner_stage": stage, "degradation": cfg.degradation.model_copy(
        update={"task": "recon", "kwargs": {"accelerations": [4], "center_fractions": [0.08]}})})
    wide = load_bundle(train_refiner(recon_cfg, model, tmp_path / "w0", max_steps=0))
    assert wide.refiner_guide == "naive+tv-pocs" and wide.refiner.conv_0.conv_0.conv.in_channels == 3
    x = torch.rand(2, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    tv = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = load_bundle(model).refiner(x)
    assert expected.abs().max() > 1e-6  # the stage-2 refiner has learned a correction: the check is not 0 == 0
    torch.testing.assert_close(wide.refiner(torch.cat([x, tv], 1)), expected)
    trained = load_bundle(train_refiner(recon_cfg, model, tmp_path / "w2", max_steps=2))
    assert trained.refiner.conv_0.conv_0.conv.weight[:, 2].abs().sum() > 0  # training weighs the TV image in
    narrow = recon_cfg.model_copy(update={"refiner_stage": stage.model_copy(update={"guide": "naive"})})
    with pytest.raises(ConfigError, match="must begin with it"):
        train_refiner(narrow, tmp_path / "w2" / "model", tmp_path / "n", max_steps=0)
    # a TV-guided refiner's one guide channel holds TV-POCS: handing it the naive inverse there would not continue it
    tv_model = train_refiner(recon_cfg.model_copy(update={"refiner_stage": stage.model_copy(
        update={"guide": "tv-pocs", "init": "identity"})}), model, tmp_path / "tv", max_steps=1)
    with pytest.raises(ConfigError, match="saw 'tv-pocs'"):
        train_refiner(recon_cfg, tv_model, tmp_path / "tv-wide", max_steps=0)
    tv_first = recon_cfg.model_copy(update={"refiner_stage": stage.model_copy(update={"guide": "tv-pocs+naive"})})
    widened = load_bundle(train_refiner(tv_first, tv_model, tmp_path / "tv-naive", max_steps=0))
    assert widened.refiner_guide == "tv-pocs+naive" and widened.refiner.conv_0.conv_0.conv.in_channels == 3
    expected = load_bundle(tv_model).refiner(x)
    assert expected.abs().max() > 1e-6  # one Adam step moved its zero last layer
    torch.testing.assert_close(widened.refiner(torch.cat([x, tv], 1)), expected)


@pytest.mark.slow
def test_a_widened_stage_resumes_where_one_run_ends(tiny_ldm, tmp_path):
    cfg, model = tiny_ldm
    recon_cfg = cfg.model_copy(update={
        "refiner_stage": cfg.refiner_stage.model_copy(update={"guide": "naive+tv-pocs", "init": "model"}),
        "degradation": cfg.degradation.model_copy(update={"task": "recon", "kwargs": {"accelerations": [4],
                                                                                     "center_fractions": [0.08]}})})
    straight = load_bundle(train_refiner(recon_cfg, model, tmp_path / "straight", max_steps=2)).refiner
    train_refiner(recon_cfg, model, tmp_path / "legs", max_steps=1)
    resumed = load_bundle(train_refiner(recon_cfg, model, tmp_path / "legs", max_steps=2, resume=True)).refiner
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)


def test_the_refiner_is_trained_on_its_guide(tiny_ldm, tmp_path, monkeypatch):
    """The wiring: each step hands apply_refiner TV-POCS of the step's own measurements (scale 1, as inference
    normalises), not the naive inverse."""
    import medldm.training.refiner as refiner_module
    from medldm.physics.classical import tv_pocs

    cfg, model = tiny_ldm
    recon_cfg = cfg.model_copy(update={
        "refiner_stage": cfg.refiner_stage.model_copy(update={"guide": "tv-pocs"}),
        "degradation": cfg.degradation.model_copy(update={"task": "recon", "kwargs": {"accelerations": [4],
                                                                                     "center_fractions": [0.08]}})})
    seen = []
    real_apply, real_guide = refiner_module.apply_refiner, refiner_module.guide_image

    def spy_guide(kind, naive, **kw):
        out = real_guide(kind, naive, **kw)
        seen.append({"naive": naive.clone(), "project": kw["project"], "scale": kw["scale"], "guide": out})
        return out

    def spy_apply(apply, residual_on, decoded, guide, *a, **k):
        seen[-1]["applied"] = guide
        return real_apply(apply, residual_on, decoded, guide, *a, **k)

    monkeypatch.setattr(refiner_module, "guide_image", spy_guide)
    monkeypatch.setattr(refiner_module, "apply_refiner", spy_apply)
    train_refiner(recon_cfg, model, tmp_path / "r", max_steps=1)
    (step,) = seen
    assert step["scale"] == 1.0 and torch.equal(step["applied"], step["guide"])
    expected = tv_pocs(step["naive"], step["project"], image_axes=(2, 3), scale=1.0)
    torch.testing.assert_close(step["guide"], expected)
    assert (step["guide"] - step["naive"]).abs().max() > 1e-3


def test_guides_made_in_worker_processes_are_the_ones_made_in_process(tiny_ldm):
    """data.num_workers moves the guide (NLM here) into DataLoader workers without changing a batch."""
    from medldm.models.normalisation import Normalisation
    from medldm.physics.classical import nlm_slices
    from medldm.physics.registry import build_random_operator
    from medldm.training.data import PatchBatches, step_stream
    from medldm.training.ldm import DegradedPairs
    from medldm.training.refiner import GuidedPairs

    cfg, _ = tiny_ldm
    norm = Normalisation(kind="percentile", scale=1.0)
    op = build_random_operator(cfg.degradation.task, cfg.data.modality, **cfg.degradation.kwargs)
    make = GuidedPairs(DegradedPairs(PatchBatches(cfg.data, seed=5), op, norm, 5, measurements=True), "nlm", norm)
    here, there = step_stream(make, 3, 0), step_stream(make, 3, 1)
    for _ in range(2):
        (x, cond, ops, _, guide), (x_w, cond_w, _, _, guide_w) = next(here), next(there)
        for a, b in ((x, x_w), (cond, cond_w), (guide, guide_w)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(guide, nlm_slices(cond, [op.sigma for op in ops], image_axes=(2, 3)))
        assert (guide - cond).abs().max() > 1e-3


@pytest.mark.slow
def test_a_warm_started_stage_continues_the_refiner_and_keeps_its_record(tiny_ldm, tmp_path):
    cfg, model = tiny_ldm
    first = train_refiner(cfg, model, tmp_path / "first", max_steps=2)
    warm = cfg.model_copy(update={"refiner_stage": cfg.refiner_stage.model_copy(update={"init": "model"})})
    untouched = load_bundle(train_refiner(warm, first, tmp_path / "zero", max_steps=0))
    for k, v in load_bundle(first).refiner.state_dict().items():
        torch.testing.assert_close(untouched.refiner.state_dict()[k], v, rtol=0, atol=0)
    earlier, stage = load_bundle(train_refiner(warm, first, tmp_path / "more", max_steps=1)).record.stage_legs("refiner")
    assert stage["steps"] == 1 and earlier["steps"] == 2 and earlier["init"] == "identity"
    assert stage["num_workers"] == cfg.data.num_workers
    fresh = load_bundle(train_refiner(cfg, first, tmp_path / "fresh", max_steps=1)).record.stage_legs("refiner")
    assert len(fresh) == 1  # a new refiner: the legs of the one it replaced are not its history


def test_the_stage_has_its_own_workers_or_the_runs(tiny_ldm):
    from medldm.training.refiner import stage_data

    cfg, _ = tiny_ldm
    assert cfg.refiner_stage.num_workers is None and stage_data(cfg).num_workers == cfg.data.num_workers
    own = cfg.model_copy(update={"refiner_stage": cfg.refiner_stage.model_copy(update={"num_workers": 3})})
    assert stage_data(own).num_workers == 3 and own.data.num_workers == cfg.data.num_workers


def test_the_loss_is_l1_plus_the_weighted_ssim_term(tiny_ldm, tmp_path, monkeypatch):
    """The term is skimage's SSIM (the evaluation's) to within its border and covariance conventions; the step's
    loss is L1 + w * term while losses.json keeps L1 alone, and the weight is recorded."""
    import json

    from skimage.metrics import structural_similarity

    import medldm.training.refiner as refiner_module

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 48, 48, generator=g), 5, 1, 2)
    y = (x + 0.05 * torch.randn(1, 1, 48, 48, generator=g)).clamp(0, 1)
    term = refiner_module.SSIMLoss(spatial_dims=2, data_range=1.0, kernel_type="uniform", win_size=7)(y, x)
    assert abs((1 - term.item()) - structural_similarity(x[0, 0].numpy(), y[0, 0].numpy(), data_range=1.0)) < 5e-3

    cfg, model = tiny_ldm
    terms, totals = [], []
    real_ssim, real_step = refiner_module.SSIMLoss, refiner_module.common.optimizer_step

    class SpySSIM(real_ssim):
        def forward(self, x, y):
            out = super().forward(x, y)
            terms.append(out.item())
            return out

    def spy_step(opt, loss, *a, **k):
        totals.append(loss.item())
        return real_step(opt, loss, *a, **k)

    monkeypatch.setattr(refiner_module, "SSIMLoss", SpySSIM)
    monkeypatch.setattr(refiner_module.common, "optimizer_step", spy_step)
    with_ssim = cfg.model_copy(update={"refiner_stage": cfg.refiner_stage.model_copy(update={"ssim_weight": 0.5})})
    out = load_bundle(train_refiner(with_ssim, model, tmp_path / "r", max_steps=2))
    assert out.record.stage_legs("refiner")[-1]["settings"]["ssim_weight"] == 0.5
    l1s = json.loads((tmp_path / "r" / "losses.json").read_text())  # L1 alone, to 6 decimals
    assert len(terms) == len(l1s) == len(totals) == 2 and all(0 < t < 1 for t in terms)
    for l1, term, total in zip(l1s, terms, totals):
        assert total == pytest.approx(l1 + 0.5 * term, abs=2e-6)


def test_a_resume_under_other_loss_or_stream_settings_is_refused(tiny_ldm, tmp_path):
    from medldm.errors import ConfigError

    cfg, model = tiny_ldm
    train_refiner(cfg, model, tmp_path / "r", max_steps=1)
    for change in ({"ssim_weight": 0.5}, {"stream_offset": 7}, {"lr": 1e-3}):  # any setting but the allowed ones
        other = cfg.model_copy(update={"refiner_stage": cfg.refiner_stage.model_copy(update=change)})
        with pytest.raises(ConfigError, match=next(iter(change))):
            train_refiner(other, model, tmp_path / "r", max_steps=2, resume=True)
    longer = cfg.model_copy(update={"refiner_stage": cfg.refiner_stage.model_copy(update={"max_minutes": 99.0,
                                                                                       "num_workers": 0})})
    assert load_bundle(train_refiner(longer, model, tmp_path / "r", max_steps=2, resume=True)
                       ).record.stage_legs("refiner")[-1]["steps"] == 2


def test_a_stream_offset_starts_the_leg_where_an_earlier_one_stopped(tiny_ldm, tmp_path, monkeypatch):
    """stream_offset k: step 0 gets the patches, degradation and sampling noise of step k of a leg without it."""
    import medldm.training.refiner as refiner_module

    cfg, model = tiny_ldm
    seen = []
    real = refiner_module.restore_slices

    def spy(bundle, cond, **kw):
        seen.append((cond.clone(), kw["seed"]))
        return real(bundle, cond, **kw)

    monkeypatch.setattr(refiner_module, "restore_slices", spy)
    train_refiner(cfg, model, tmp_path / "plain", max_steps=3)
    later = cfg.model_copy(update={"refiner_stage": cfg.refiner_stage.model_copy(update={"stream_offset": 2})})
    out = load_bundle(train_refiner(later, model, tmp_path / "offset", max_steps=1))
    (plain0, _), _, (plain2, seed2), (offset0, seed0) = seen
    torch.testing.assert_close(offset0, plain2, rtol=0, atol=0)
    assert seed0 == seed2 and not torch.equal(offset0, plain0)
    assert out.record.stage_legs("refiner")[-1]["settings"]["stream_offset"] == 2
