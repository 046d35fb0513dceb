"""A saved model's configuration (model.json) and its training record (training.json), typed and versioned.

model.json holds what inference needs to rebuild the networks and use them, nothing else; it is validated once,
when the folder is loaded, and read as attributes afterwards (``bundle.config.task``). training.json holds what
happened: steps and seconds, the stages' legs (oldest first), validation metrics, the install check and the
card's reproduction command. Models written before format 2 (one model.json with the history nested in it) are
converted when loaded; ``medldm.models.model_config.convert_folder`` rewrites such a folder in place. Format 3
added ``default_use_diffusion`` (format-2 models read as True, what they did).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from medldm import __version__
from medldm.config import (DegradationConfig, RefinerConfig, RefinerGuide, SchedulerConfig, Strict, UNetConfig,
                           VAEConfig)
from medldm.errors import ModelError
from medldm.models.normalisation import Normalisation

FORMAT = "medldm-model/3"
RECORD_FORMAT = "medldm-training-record/1"
OLD_FORMATS = ("medldm-model/1", "medldm-model/2")  # converted when read


class NormalisationConfig(Strict):
    """medldm.models.normalisation.Normalisation's settings (its scale is fitted per input)."""

    kind: Literal["percentile", "window"]
    percentile: float = Field(99.5, gt=0, le=100)
    low: float = -1024.0
    high: float = 2000.0
    # The intensity the VAE (and so the latent path) sees the input at. Training volumes are normalised by their
    # clean percentile, and the VAE decodes at that intensity whatever its input's (28.3 dB at 1x, 25.1 at 0.95x).
    # "input": the naive inverse's percentile, which noise lifts (Rician 5%: the truth lands at 0.93x); "guide":
    # the latent path takes the percentile of the model's classical guide (the first non-naive part of its refiner
    # guide), an estimate of the clean image's, and its decoded image is scaled back. The pixel path (refiner,
    # data consistency) keeps the input's: the refiner measured as well or better there.
    latent_fit_on: Literal["input", "guide"] = "input"

    def unfitted(self) -> Normalisation:
        """The normalisation these settings make (the latent path's fit is the reconstructor's); fit it before use."""
        return Normalisation.from_dict(self.model_dump(exclude={"latent_fit_on"}))


class ModelRefinerConfig(RefinerConfig):
    """The refiner as trained: its network, plus what it sees beside the decoded estimate (``guide``) and how
    many passes (``cascades``, each followed by data consistency) its refiner stage trained it for."""

    guide: RefinerGuide = "naive"
    cascades: int = Field(1, ge=1, le=8)


class ModelConfig(Strict):
    format: Literal["medldm-model/3"] = FORMAT
    medldm_version: str = __version__
    name: str
    kind: Literal["vae", "ldm"]
    task: Literal["denoise", "recon", "sr"] | None = None
    modality: Literal["MR", "CT"]
    spatial_dims: Literal[2, 3]
    slice_axis: Literal[0, 1, 2] = 2  # 2D models: the index axis (of the RAS-oriented volume) slices run along
    patch_size: list[int]
    normalisation: NormalisationConfig
    vae: VAEConfig
    latent_scale: float | None = Field(None, gt=0)
    unet: UNetConfig | None = None
    scheduler: SchedulerConfig | None = None
    refiner: ModelRefinerConfig | None = None
    degradation: DegradationConfig | None = None
    cond_noise_max: float | None = Field(None, ge=0)
    # sampler steps when the caller gives none: the fewest that measure as well as more
    # (benchmarks/steps_quality.py on the held-out cases; the card states the figures)
    default_steps: int = Field(10, ge=1)
    # False where the decoded VAE estimate of the input measured as well as a diffusion sample (same script): the
    # default then skips the U-Net, at the same quality in less time. Two or more samples always sample, since
    # the spread between samples is what was asked for.
    default_use_diffusion: bool = True
    weights_dtype: Literal["float16", "float32"] = "float32"

    @model_validator(mode="after")
    def _consistent(self):
        if len(self.patch_size) != self.spatial_dims:
            raise ValueError(f"patch_size {self.patch_size} needs {self.spatial_dims} entries")
        if self.kind == "ldm":
            missing = [k for k in ("task", "unet", "scheduler", "degradation", "latent_scale")
                       if getattr(self, k) is None]
            if missing:
                raise ValueError(f"an ldm model needs {', '.join(missing)}")
            if self.degradation.task != self.task:
                raise ValueError(f"degradation.task {self.degradation.task!r} is not the model's task {self.task!r}")
        if self.normalisation.latent_fit_on == "guide" and (self.normalisation.kind != "percentile"
                                                     or self.normalisation_reference is None or self.spatial_dims != 2):
            raise ValueError("normalisation.latent_fit_on 'guide' needs a 2D model, a percentile normalisation and a "
                             "refiner guide with a classical part (nlm, tv-pocs, tv-pocs-warm)")
        return self

    @property
    def refiner_enabled(self) -> bool:
        return self.refiner is not None and self.refiner.enabled

    @property
    def normalisation_reference(self) -> str | None:
        """The classical image a "guide"-fitted latent intensity takes its percentile of (None: no such guide)."""
        parts = self.refiner.guide.split("+") if self.refiner is not None else []
        return next((p for p in parts if p != "naive"), None)


class TrainingRecord(Strict):
    """What happened to make the weights; free-form inside each entry, typed at the top."""

    format: Literal["medldm-training-record/1"] = RECORD_FORMAT
    training: dict[str, Any] = Field(default_factory=dict)  # the U-Net's (or VAE's) run: steps, seconds, device...
    legs: list[dict[str, Any]] = Field(default_factory=list)  # later stages, oldest first; each has "stage"
    metrics: dict[str, float] = Field(default_factory=dict)
    validation_check: dict[str, Any] | None = None  # the install check (medldm.evaluation.check)
    card: dict[str, Any] | None = None  # command and machine that reproduce the model (pipelines/write_model_cards.py)

    def stage_legs(self, stage: Literal["refiner", "bridge"]) -> list[dict[str, Any]]:
        """The legs of one stage, oldest first (the last one made the weights as saved)."""
        return [leg for leg in self.legs if leg.get("stage") == stage]


def _errors(err: ValidationError, source: str) -> str:
    fields = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors())
    return f"{source}: invalid model configuration ({fields})"


def _legs(stage: str, entry: dict | None) -> list[dict]:
    """A format-1 stage entry (newest leg, each nesting its predecessor under "continued") -> legs, oldest first."""
    legs = []
    while entry:
        leg = {k: v for k, v in entry.items() if k != "continued"}
        legs.append({"stage": stage, **leg})
        entry = entry.get("continued")
    return legs[::-1]


def convert_v1(meta: dict) -> tuple[dict, dict]:
    """A format-1 model.json -> (model.json, training.json) of the current formats, as dicts."""
    record_keys = ("training", "metrics", "validation_check", "card", "refiner_stage", "bridge_stage", "format")
    config = {k: v for k, v in meta.items() if k not in record_keys}
    stage = meta.get("refiner_stage") or {}
    if config.get("refiner") is not None:
        # format-1 refiners saved before residual_on existed added their correction to the decoded estimate
        config["refiner"] = {"residual_on": "decoded", **config["refiner"], "guide": stage.get("guide", "naive"),
                             "cascades": stage.get("cascades", 1)}
    config["format"] = FORMAT
    record = {"format": RECORD_FORMAT, "training": meta.get("training") or {},
              "legs": _legs("bridge", meta.get("bridge_stage")) + _legs("refiner", meta.get("refiner_stage")),
              "metrics": meta.get("metrics") or {}, "validation_check": meta.get("validation_check"),
              "card": meta.get("card")}
    return config, record


def parse_model_files(config: dict, record: dict | None, source: str) -> tuple[ModelConfig, TrainingRecord]:
    """Validate a model.json (any known format) and its training.json; ModelError naming the field otherwise."""
    fmt = config.get("format")
    if fmt == "medldm-model/1":
        config, record = convert_v1(config)
    elif fmt == "medldm-model/2":
        config = {**config, "format": FORMAT}
    elif fmt != FORMAT:
        raise ModelError(f"{source}: unknown model format {fmt!r}: this medldm ({__version__}) reads {FORMAT} and "
                         f"converts {', '.join(OLD_FORMATS)}; a newer medldm wrote it, so upgrade medldm")
    try:
        return ModelConfig.model_validate(config), TrainingRecord.model_validate(record or {})
    except ValidationError as err:
        raise ModelError(_errors(err, source)) from None


def read_model_files(folder: str | Path) -> tuple[ModelConfig, TrainingRecord]:
    folder = Path(folder)
    path = folder / "model.json"
    if not path.is_file():
        raise ModelError(f"{folder}: not a medldm model folder (no model.json)")
    try:
        config = json.loads(path.read_text())
        record_path = folder / "training.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{folder}: model.json or training.json is not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(record, (dict, type(None))):
        raise ModelError(f"{folder}: model.json and training.json must hold JSON objects")
    return parse_model_files(config, record, str(path))


def read_record(folder: str | Path) -> TrainingRecord:
    """A model folder's training record alone (its training.json, or what a format-1 model.json held)."""
    folder = Path(folder)
    try:
        if (folder / "training.json").is_file():
            return TrainingRecord.model_validate_json((folder / "training.json").read_text())
        return TrainingRecord.model_validate(convert_v1(json.loads((folder / "model.json").read_text()))[1])
    except (OSError, ValueError) as err:  # pydantic's ValidationError and JSON errors are ValueErrors
        raise ModelError(f"{folder}: no readable training record ({err})") from None


def write_model_files(folder: str | Path, config: ModelConfig, record: TrainingRecord) -> None:
    """Both files, each written whole then renamed (a reader never sees half a file)."""
    folder = Path(folder)
    for name, obj in (("model.json", config), ("training.json", record)):
        tmp = folder / f"{name}.tmp"
        tmp.write_text(json.dumps(obj.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
        tmp.replace(folder / name)


def convert_folder(folder: str | Path) -> bool:
    """Rewrite a format-1 model folder in the current formats (weights untouched); False if already current."""
    folder = Path(folder)
    if json.loads((folder / "model.json").read_text()).get("format") == FORMAT:
        return False
    write_model_files(folder, *read_model_files(folder))
    return True
