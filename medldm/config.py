"""Typed, validated configuration. Every YAML in configs/ loads into one of these or fails naming file and field.

Pydantic models with ``extra="forbid"``: an unknown key, a wrong type or an impossible value is a
ConfigError at load time, never a surprise deep inside a constructor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medldm.errors import ConfigError


# what a refiner sees beside the decoded estimate: classical images joined by "+" (physics.classical.guide_parts)
RefinerGuide = Literal["naive", "tv-pocs", "tv-pocs-warm", "nlm", "naive+tv-pocs", "tv-pocs+naive"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    datalist: str = "data/datalist.json"
    spatial_dims: Literal[2, 3] = 2
    patch_size: list[int] = Field(default_factory=lambda: [96, 96])
    modality: Literal["MR", "CT"] = "MR"
    batch_size: int = Field(8, ge=1)
    samples_per_volume: int = Field(8, ge=1)
    cache: Literal["none", "memory", "disk"] = "memory"
    num_workers: int = Field(0, ge=0)
    max_volumes: int | None = Field(None, ge=1)
    # 2D models: which index axis slices are taken along (2 = axial XY planes; 0 = YZ planes, which
    # contain the slice axis Z, as thick-slice super-resolution needs).
    slice_axis: Literal[0, 1, 2] = 2
    # Random flips of each patch axis (and transposes of square 2D patches) before degradation. Every MR
    # training volume is one anatomy (MNI152 and warps of it): without them the networks learn its
    # particular detail, which held-out anatomy does not share.
    augment: bool = False
    # Relative draw weight of each volume of a source (datalist "source"; others weigh 1): 20 warps of one
    # template outnumber the other real heads 40 files to 3, and weights decide how often each anatomy is seen.
    source_weights: dict[str, float] = Field(default_factory=dict)
    # Which datalist sources to train on (None: all). The configs of shipped models name theirs, so a datalist
    # that gained sources later still reproduces their weights.
    sources: list[str] | None = None

    @field_validator("source_weights")
    @classmethod
    def _positive_weights(cls, v):
        bad = {k: w for k, w in v.items() if not w > 0}
        if bad:
            raise ValueError(f"source weights must be > 0, got {bad}")
        return v

    @model_validator(mode="after")
    def _patch_matches_dims(self):
        if len(self.patch_size) != self.spatial_dims:
            raise ValueError(f"patch_size has {len(self.patch_size)} entries but spatial_dims is {self.spatial_dims}")
        return self


class VAEConfig(Strict):
    """monai.networks.nets.AutoencoderKL; each entry of ``channels`` after the first halves the resolution."""

    channels: list[int] = Field(default_factory=lambda: [32, 64])
    num_res_blocks: int = Field(1, ge=1)
    latent_channels: int = Field(4, ge=1)
    norm_num_groups: int = Field(16, ge=1)
    attention: bool = False

    @model_validator(mode="after")
    def _groups_divide(self):
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        return self

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)


class UNetConfig(Strict):
    """monai.networks.nets.DiffusionModelUNet working on latents."""

    channels: list[int] = Field(default_factory=lambda: [64, 128, 128])
    num_res_blocks: int = Field(1, ge=1)
    attention_levels: list[bool] = Field(default_factory=lambda: [False, False, True])
    num_head_channels: int = Field(32, ge=1)
    norm_num_groups: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _lengths(self):
        if len(self.attention_levels) != len(self.channels):
            raise ValueError("attention_levels must have one entry per channels entry")
        return self


class RefinerConfig(Strict):
    """A small pixel-space MONAI BasicUNet: (decoded estimate, naive inverse) -> residual correction.

    ``residual_on`` says what the correction is added to. "naive": the naive inverse, so an untrained
    refiner already returns the measurement's own image and training only has to add what the latent
    estimate knows (far more sample-efficient on CPU budgets); "decoded": the decoded latent estimate.
    """

    enabled: bool = True
    residual_on: Literal["naive", "decoded"] = "naive"
    features: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 256, 16])

    @model_validator(mode="after")
    def _six(self):
        if len(self.features) != 6:
            raise ValueError("refiner.features needs 6 entries (BasicUNet)")
        return self


class SchedulerConfig(Strict):
    kind: Literal["ddpm", "ddim", "rflow"] = "ddpm"
    num_train_timesteps: int = Field(1000, ge=10)
    schedule: Literal["linear_beta", "scaled_linear_beta", "cosine"] = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"
    # Where sampling starts (rflow only). "noise": N(0, I), the classic latent diffusion. A guide's name: the flow
    # runs from that classical image's latent plus ``start_noise`` x N(0, I) to the truth's latent, and the U-Net is
    # conditioned on that latent (a bridge, as in InDI / I2SB / ResShift): it learns only what the guide misses, in
    # a few steps, and its samples spread where the measurement leaves the answer open.
    start: Literal["noise", "naive", "tv-pocs", "nlm"] = "noise"
    start_noise: float = Field(0.5, gt=0)

    @model_validator(mode="after")
    def _start_needs_rflow(self):
        if self.start != "noise" and self.kind != "rflow":
            raise ValueError(f"start {self.start!r} (a flow from a guide) needs kind: rflow, not {self.kind!r}")
        return self


class DegradationConfig(Strict):
    """Which RandomOperator makes training pairs; kwargs go to medldm.physics.build_random_operator."""

    task: Literal["denoise", "recon", "sr"]
    kwargs: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(Strict):
    steps: int = Field(1000, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    val_every: int = Field(200, ge=1)
    ckpt_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    amp: bool = True  # used only on CUDA
    ema_decay: float = Field(0.999, ge=0, lt=1)
    # VAE losses
    kl_weight: float = Field(1e-6, ge=0)
    ssim_weight: float = Field(0.0, ge=0)
    adv_weight: float = Field(0.0, ge=0)
    adv_start: int = Field(0, ge=0)
    # MONAI PerceptualLoss, only from LOCAL weights (torchvision ResNet-50 state dict): never downloads
    perceptual_weight: float = Field(0.0, ge=0)
    perceptual_weights_path: str | None = None
    # LDM: condition noise augmentation (max std of noise added to the encoded condition)
    cond_noise_max: float = Field(0.1, ge=0)
    refiner_weight: float = Field(1.0, ge=0)
    max_minutes: float | None = Field(None, gt=0)


    @model_validator(mode="after")
    def _perceptual_needs_local_weights(self):
        if self.perceptual_weight > 0 and not self.perceptual_weights_path:
            raise ValueError("perceptual_weight > 0 needs perceptual_weights_path (a local ResNet-50 state dict); "
                             "medldm never downloads weights")
        return self


class TrackingConfig(Strict):
    enabled: bool = True
    experiment: str = "medldm"
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI or MLflow's default (sqlite:///mlflow.db)


class VAERunConfig(Strict):
    kind: Literal["vae"] = "vae"
    name: str
    data: DataConfig = Field(default_factory=DataConfig)
    vae: VAEConfig = Field(default_factory=VAEConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    calibration_batches: int = Field(16, ge=1)


class RefinerStageConfig(Strict):
    """Stage 3 (``medldm.training.refiner``): the refiner retrained on real sampler outputs, U-Net frozen."""

    enabled: bool = False
    max_minutes: float = Field(10.0, gt=0)
    sample_steps: int = Field(5, ge=1)  # DDIM steps per training batch: inference's estimate, at a CPU price
    lr: float = Field(1e-4, gt=0)
    # the stage's own patches (the supervised baseline sees the same): None keeps data.patch_size
    patch_size: list[int] | None = None
    augment: bool = True
    # "identity": a fresh refiner whose untrained output is the naive inverse; "model": warm-start from the
    # stage-2 refiner (which learned the shortcut above)
    init: Literal["identity", "model"] = "identity"
    # recon and SR end with hard data consistency at inference: train the refiner on what DC leaves of its
    # output (the loss after the same projection), so it spends nothing on what the measurement fixes anyway
    loss_after_dc: bool = False
    # refiner passes, each followed by that projection (recon, SR): an unrolled, weight-shared cascade in
    # the spirit of MoDL and VarNet; pass k > 1 refines the projected output of pass k - 1
    cascades: int = Field(1, ge=1, le=8)
    # what the refiner sees beside the decoded estimate, and adds its correction to: the naive inverse,
    # TV-POCS started from it (recon, SR) or its 2D non-local means (MR denoise): classical estimates that know
    # no anatomy and so cannot overfit one; "naive+tv-pocs": both, as two input channels (the correction is added
    # to the naive inverse), so the refiner can lean on TV where the naive inverse is poor (ct-recon at 60 views)
    # and on the naive inverse where TV over-smooths (90 views); with init: model the added channel starts unused
    # ("tv-pocs+naive" widens a TV-guided refiner the same way: the correction stays on TV-POCS)
    guide: RefinerGuide = "naive"
    # weight of an SSIM term (MONAI SSIMLoss, the evaluation's 7-pixel uniform window) beside the L1 loss: L1 alone
    # leaves faint texture on flat regions that costs SSIM more than PSNR (mr-recon MNI 4x: PSNR level with
    # TV-POCS, SSIM 0.007 under it)
    ssim_weight: float = Field(0.0, ge=0)
    # start the stage's patch stream (patches, degradations, sampling noise) this many steps in: a leg continuing
    # earlier ones (init: model) otherwise redraws their patches, its stream restarting at the seed
    stream_offset: int = Field(0, ge=0)
    # worker processes drawing the stage's patches and guides (None: data.num_workers); every step gets the same
    # batch whatever the number, but a stage that stops on max_minutes takes more steps with more workers
    num_workers: int | None = Field(None, ge=0)
    # the saved model's normalisation.latent_fit_on (medldm.models.model_config), set with the guide it takes its
    # percentile from; None keeps the model's
    latent_fit_on: Literal["input", "guide"] | None = None


class BridgeStageConfig(Strict):
    """The latent U-Net trained as a flow from a guide's latent to the truth's (``medldm.training.bridge``), on a
    bank of precomputed latents (``medldm.training.banks``): a step costs the U-Net alone."""

    guide: Literal["naive", "tv-pocs", "nlm"] = "naive"  # the image the flow starts from (its latent, plus noise)
    start_noise: float = Field(0.5, gt=0)  # std of the noise added to the start latent (latents have unit std)
    # Each training start moved towards its truth by a factor drawn from U(start_shrink_min, 1) (1 = off): the bank's
    # starts are worse than whole-slice guides at inference, and a flow that only saw bad starts over-corrects good ones.
    start_shrink_min: float = Field(1.0, gt=0, le=1)
    bank_batches: int = Field(400, ge=1)  # data batches (data.batch_size pairs each) encoded into the bank
    bank_workers: int = Field(0, ge=0)  # worker processes making the bank's guides
    init: Literal["model", "fresh"] = "model"  # start from the model's U-Net, or a new one of unet's config
    # A VAE model folder (medldm train vae) that replaces the model's VAE for the bank and the flow (init: fresh);
    # the saved model carries it, and the refiner stage then learns its decodes.
    vae: str | None = None
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-4, gt=0)
    max_minutes: float = Field(20.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ckpt_every: int = Field(200, ge=1)
    val_every: int = Field(250, ge=1)


class LDMRunConfig(Strict):
    kind: Literal["ldm"] = "ldm"
    name: str
    vae_path: str
    degradation: DegradationConfig
    data: DataConfig = Field(default_factory=DataConfig)
    unet: UNetConfig = Field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    refiner: RefinerConfig = Field(default_factory=RefinerConfig)
    refiner_stage: RefinerStageConfig = Field(default_factory=RefinerStageConfig)
    bridge_stage: BridgeStageConfig = Field(default_factory=BridgeStageConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _degradation_builds(self):
        # Fail at load time, naming the field, rather than at the first training step.
        from medldm.physics.registry import build_random_operator

        try:
            build_random_operator(self.degradation.task, self.data.modality, **self.degradation.kwargs)
        except (ConfigError, TypeError, ValueError) as err:
            raise ValueError(f"degradation.kwargs: {err}") from None
        return self


RUN_CONFIGS = {"vae": VAERunConfig, "ldm": LDMRunConfig}


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  field '{field}': {e['msg']}")
    return "\n".join(lines)


def parse_config(data: dict, cls: type[Strict], source: str = "<dict>") -> Strict:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | Path, kind: str | None = None, overrides: dict | None = None):
    """Load a run config YAML; ``kind`` ('vae'|'ldm') is checked against the file's own ``kind``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    file_kind = data.get("kind", kind)
    if kind is not None and file_kind != kind:
        raise ConfigError(f"{path}: field 'kind' is {file_kind!r} but a {kind!r} config was expected")
    if file_kind not in RUN_CONFIGS:
        raise ConfigError(f"{path}: field 'kind' must be one of {sorted(RUN_CONFIGS)}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_config(data, RUN_CONFIGS[file_kind], str(path))
