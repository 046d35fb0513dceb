"""Rebuild operators from (task, modality, JSON params): configs, saved models and provenance records.

``build_operator(task, modality, op.params())`` returns an operator equal to ``op`` (same masks, noise
realisation and geometry). ``params["operator"]`` names the class; without it the default for the
(task, modality) pair is used. Every failure is a ConfigError naming the field.
"""

from __future__ import annotations

import inspect
from typing import Any

from medldm.errors import ConfigError
from medldm.physics.base import Operator, RandomOperator
from medldm.physics.ct import LowDoseCT, RandomLowDoseCT, RandomSparseViewCT, SparseViewCT
from medldm.physics.kspace import CartesianUndersampling, RandomCartesianUndersampling
from medldm.physics.noise import RandomRicianNoise, RicianNoise
from medldm.physics.sense import MultiCoilCartesian, RandomMultiCoilUndersampling
from medldm.physics.resolution import InPlaneDownsample, RandomInPlaneDownsample, RandomThickSlice, ThickSlice

TASKS = ("denoise", "recon", "sr")
DC_TASKS = ("recon", "sr")  # the tasks whose measurement is kept: data consistency ends their inference
MODALITIES = ("MR", "CT")

OPERATORS: dict[str, type[Operator]] = {c.__name__: c for c in (
    CartesianUndersampling, MultiCoilCartesian, RicianNoise, LowDoseCT, SparseViewCT, ThickSlice, InPlaneDownsample)}
RANDOM_OPERATORS: dict[str, type[RandomOperator]] = {
    "CartesianUndersampling": RandomCartesianUndersampling, "MultiCoilCartesian": RandomMultiCoilUndersampling,
    "RicianNoise": RandomRicianNoise,
    "LowDoseCT": RandomLowDoseCT, "SparseViewCT": RandomSparseViewCT, "ThickSlice": RandomThickSlice,
    "InPlaneDownsample": RandomInPlaneDownsample,
}
DEFAULTS = {("recon", "MR"): "CartesianUndersampling", ("denoise", "MR"): "RicianNoise",
            ("recon", "CT"): "SparseViewCT", ("denoise", "CT"): "LowDoseCT",
            ("sr", "MR"): "ThickSlice", ("sr", "CT"): "ThickSlice"}
# Which modalities each physics model describes (k-space and Rician noise are MR-only; CT physics CT-only).
ALLOWED_MODALITIES = {"CartesianUndersampling": ("MR",), "MultiCoilCartesian": ("MR",), "RicianNoise": ("MR",), "LowDoseCT": ("CT",),
                      "SparseViewCT": ("CT",), "ThickSlice": MODALITIES, "InPlaneDownsample": MODALITIES}


def _normalise(task: str, modality: str) -> tuple[str, str]:
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    mod = str(modality).upper()
    mod = {"MRI": "MR"}.get(mod, mod)
    if mod not in MODALITIES:
        raise ConfigError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return task, mod


def _resolve(task: str, modality: str, name: str | None) -> str:
    task, mod = _normalise(task, modality)
    name = name or DEFAULTS[(task, mod)]
    if name not in OPERATORS:
        raise ConfigError(f"field 'operator': unknown operator {name!r}; known: {sorted(OPERATORS)}")
    if OPERATORS[name].task != task:
        raise ConfigError(f"field 'operator': {name} is a {OPERATORS[name].task!r} operator, not {task!r}")
    if mod not in ALLOWED_MODALITIES[name]:
        raise ConfigError(f"field 'operator': {name} does not apply to modality {mod}")
    return name


def _accepted(cls) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        names |= {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return names


def _construct(cls, kwargs: dict[str, Any], what: str):
    unknown = sorted(set(kwargs) - _accepted(cls))
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {unknown} for {cls.__name__}; accepted: {sorted(_accepted(cls))}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what}: invalid parameters for {cls.__name__}: {err}") from None


def build_operator(task: str, modality: str, params: dict[str, Any] | None = None) -> Operator:
    """The deterministic operator described by ``params`` (the output of some operator's ``params()``)."""
    params = dict(params or {})
    name = _resolve(task, modality, params.pop("operator", None))
    return _construct(OPERATORS[name], params, "degradation params")


def build_random_operator(task: str, modality: str, **kwargs) -> RandomOperator:
    """The RandomOperator for (task, modality); ``operator=`` picks a non-default physics (e.g. InPlaneDownsample)."""
    name = _resolve(task, modality, kwargs.pop("operator", None))
    return _construct(RANDOM_OPERATORS[name], kwargs, "degradation kwargs")
