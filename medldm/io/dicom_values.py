"""Parsing DICOM files and checked access to their header values, for the series reader.

pydicom decodes element values lazily, on first access, so a corrupt VR or a value that does not fit its VR
(an unknown VR, a 2-byte value read as SL, ...) would otherwise raise wherever the value is first used.
``decode_header`` decodes every non-pixel element once, right after the file is read: one the reader needs
that fails makes the file unreadable, any other is dropped. The typed getters turn values of the wrong type
(text where a number belongs, several values where one belongs) and non-finite numbers into an InputError that
names the file and the element.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from medldm.errors import InputError

log = logging.getLogger(__name__)

_PIXEL_GROUP = 0x7FE0  # (Float/DoubleFloat)PixelData: decoded by pixel_array, and far too large to decode twice


def _looks_like_raw_dicom(path: Path) -> bool:
    # Old files without the 128-byte preamble start directly with a group 0002 or 0008 element.
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    if len(head) < 8:
        return False
    group = int.from_bytes(head[:2], "little")
    return group in (0x0002, 0x0008) and int.from_bytes(head[2:4], "little") < 0x0100


def parse_file(path: Path, **kwargs) -> tuple[pydicom.FileDataset | None, str]:
    """(dataset, "") or (None, why the file cannot be parsed); never raises for a bad file."""
    try:
        return pydicom.dcmread(path, **kwargs), ""
    except InvalidDicomError:
        if not _looks_like_raw_dicom(path):
            return None, "not a DICOM file"
        try:
            return pydicom.dcmread(path, force=True, **kwargs), ""
        except Exception as exc:  # noqa: BLE001 - any parse failure means "unusable file"
            return None, f"unreadable DICOM ({type(exc).__name__}: {exc})"
    except IsADirectoryError:
        return None, "is a folder"
    except OSError as exc:
        return None, f"cannot open ({exc.strerror or exc})"
    except Exception as exc:  # noqa: BLE001
        return None, f"unreadable DICOM ({type(exc).__name__}: {exc})"


def error_text(exc: BaseException, limit: int = 200) -> str:
    text = (str(exc).splitlines() or [""])[0]
    text = text.split(" This occurred while trying to parse")[0].split(" To replace this error")[0]
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


def decode_header(ds, needed: frozenset[str]) -> str:
    """Decode the value of every element of ``ds`` and its file meta now; "" or why the header is unreadable.

    An element that does not decode makes the header unreadable when its keyword is in ``needed`` or it belongs
    to the Image Pixel group (0028,xxxx), which pixel decoding reads; any other one (a private tag, a field the
    reader never uses) is deleted from the in-memory dataset so that nothing trips on it later. Pixel data and
    deferred values (``dcmread(defer_size=...)``) are left alone; whoever needs a deferred value reads it in a
    guarded place.
    """
    try:
        for dataset in (getattr(ds, "file_meta", None), ds):
            for tag in list(dataset.keys()) if dataset is not None else ():
                if tag.group == _PIXEL_GROUP:
                    continue
                raw = dataset.get_item(tag, keep_deferred=True)
                if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
                    continue
                try:
                    dataset[tag]
                except Exception as exc:  # noqa: BLE001 - unknown VR, bytes/VR mismatch, bad IS/DS text...
                    keyword = keyword_for_tag(tag)
                    name = f"({tag.group:04X},{tag.element:04X}) {keyword or 'private'}"
                    why = f"{name} with VR {getattr(raw, 'VR', '?')}: {error_text(exc)}"
                    if keyword in needed or tag.group == 0x0028:
                        return f"unreadable DICOM header ({why})"
                    log.debug("dropping undecodable element %s", why)
                    del dataset[tag]
    except Exception as exc:  # noqa: BLE001 - never let a header walk crash a scan
        return f"unreadable DICOM header ({error_text(exc)})"
    return ""


def text_value(ds, keyword: str) -> str:
    """``keyword`` as text ("" when absent), from the raw bytes when its value cannot be decoded with its VR."""
    try:
        return str(ds.get(keyword, "") or "")
    except Exception:  # noqa: BLE001
        raw = ds.get_item(tag_for_keyword(keyword), keep_deferred=True)
        value = getattr(raw, "value", None)
        return value.decode("ascii", "replace").strip("\0 ") if isinstance(value, bytes) else ""


def _short(value) -> str:
    text = repr(list(value) if isinstance(value, MultiValue) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(value) -> float | None:
    """A single decoded value as a float, or None when it is not one number (bytes, lists, names...)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, Decimal)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _missing(value) -> bool:
    return value is None or (isinstance(value, str) and value == "")


def as_int(ds, keyword: str, path: Path, default: int | None = None) -> int | None:
    """An integer element (Rows, NumberOfFrames, SeriesNumber...); ``default`` when absent or empty."""
    value = ds.get(keyword)
    if _missing(value):
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    number = _number(value)
    if number is None or not np.isfinite(number) or not number.is_integer():
        raise InputError(path, f"invalid {keyword} {_short(value)}: expected one integer")
    return int(number)


def as_float(ds, keyword: str, path: Path, default: float | None = None) -> float | None:
    """A single finite number (SliceThickness, RescaleSlope...); ``default`` when absent or empty."""
    value = ds.get(keyword)
    if _missing(value):
        return default
    number = _number(value)
    if number is None:
        raise InputError(path, f"invalid {keyword} {_short(value)}: expected one number")
    if not np.isfinite(number):
        raise InputError(path, f"{keyword} {_short(value)} is not finite (NaN/Inf)")
    return number


def as_floats(ds, keyword: str, n: int, path: Path) -> np.ndarray:
    """``n`` finite numbers (ImagePositionPatient, ImageOrientationPatient, PixelSpacing); the element is required."""
    value = ds.get(keyword)
    if _missing(value):
        raise InputError(path, f"missing {keyword}: not a cross-sectional image with known geometry")
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    numbers = [_number(v) for v in items]
    if any(v is None for v in numbers):
        raise InputError(path, f"invalid {keyword} {_short(value)}")
    arr = np.asarray(numbers, dtype=np.float64)
    if arr.shape != (n,):
        raise InputError(path, f"{keyword} must have {n} values, got {len(arr)}")
    if not np.all(np.isfinite(arr)):
        raise InputError(path, f"{keyword} {arr.tolist()} is not finite (NaN/Inf)")
    return arr


def jsonable(value):
    """A header value as plain JSON-friendly Python (None for binary data and sequences)."""
    if value is None or isinstance(value, (bytes, bytearray, DicomSequence)):
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    return str(value)
