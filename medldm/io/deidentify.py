"""De-identification of derived DICOM: the DICOM PS3.15 Basic Application Level Confidentiality Profile, as far
as a derived series can carry identifiers, with dicognito doing the replacing.

dicognito replaces every person name, UID, listed ID, address, institution and station, shifts dates and times
by one offset, and maps each original value to the same new one for as long as one ``Deidentifier`` lives (so
the series of one study stay one study). This module adds what the Basic Profile asks beyond that for the
attributes medldm's writer copies: free-text descriptions and patient characteristics removed or emptied, device
serial numbers removed, dates removed on request, the de-identification recorded (PatientIdentityRemoved,
DeidentificationMethod and its code sequence), and series whose pixels carry burned-in annotation refused:
a reconstruction keeps what the pixels show, so no header change makes them safe.

The mapping is keyed by a secret: random for each ``Deidentifier`` unless one is given. Keep a given secret out
of the output folder: with it and a guess of an original value, the guess can be confirmed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from importlib.metadata import version
from typing import Literal

import pydicom
from dicognito.anonymizer import Anonymizer

from medldm.errors import InputError

# Basic Profile action X (remove) for attributes medldm's writer may copy from its source, and type-2 ones
# (present, possibly empty) whose action is Z (empty). Names, UIDs, IDs and dates are dicognito's.
REMOVE = ("StudyDescription", "ProtocolName", "DeviceSerialNumber", "PatientAge", "PatientWeight", "PatientSize",
          "AdditionalPatientHistory", "PatientComments", "ImageComments", "RequestAttributesSequence",
          "InstitutionalDepartmentName", "InstitutionAddress", "OtherPatientNames", "PatientAddress")
EMPTY = ("PatientSex", "PatientBirthDate", "StudyID")
_DATE_VRS = ("DA", "DT", "TM")
# CID 7050 (De-identification Method): the profile, and the option applied to dates when they are kept shifted
BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")


class Deidentifier:
    """Callable on a ``pydicom.Dataset`` about to be written; one instance per run keeps the mapping consistent.

    ``dates``: "shift" (one random offset of 62-730 days back, intervals kept) or "remove" (every date and time
    emptied). ``secret``: the key of the mapping (random when None): the same secret gives the same new UIDs,
    names and offsets, so a run resumed later or another run of the same site stays consistent."""

    def __init__(self, dates: Literal["shift", "remove"] = "shift", secret: str | None = None):
        if dates not in ("shift", "remove"):
            raise ValueError(f"dates must be 'shift' or 'remove', got {dates!r}")
        self.dates = dates
        self._secret = secret if secret is not None else secrets.token_hex(32)
        self._anonymizer = Anonymizer(seed=self._secret)

    def hash_text(self, text: str) -> str:
        """A keyed digest of a path or other identifying text (HMAC-SHA256, 16 hex digits): equal texts give equal
        digests under one secret; without the secret, a guess cannot be checked."""
        return hmac.new(self._secret.encode(), text.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:16]

    def redact(self, text: str, values) -> str:
        """``text`` (an error message) with each of ``values`` (paths, UIDs) replaced by its digest, longest first
        (a folder's name inside a file's path goes with the file's)."""
        for p in sorted({str(p) for p in values if p}, key=len, reverse=True):
            text = text.replace(p, f"<input {self.hash_text(p)}>")
        return text

    @property
    def method(self) -> list[str]:
        """DeidentificationMethod's values (LO: 64 characters each)."""
        return ["medldm --deidentify", f"PS3.15 Basic Profile via dicognito {version('dicognito')}",
                "dates shifted" if self.dates == "shift" else "dates removed"]

    def check_source(self, burned_in_annotation: str | None, where) -> None:
        """Refuse a source whose pixels are marked as carrying burned-in text (names, dates on the image)."""
        if str(burned_in_annotation or "").strip().upper() == "YES":
            raise InputError(where, "the source series says BurnedInAnnotation YES: its pixels carry text that "
                                    "de-identifying the header cannot remove; leave it out of a --deidentify run")

    def __call__(self, ds: pydicom.Dataset) -> pydicom.Dataset:
        self.check_source(ds.get("BurnedInAnnotation"), "the dataset to write")  # not its description: free text
        for keyword in REMOVE:
            if keyword in ds:
                delattr(ds, keyword)
        ds.walk(_none_to_empty)  # dicognito expects text where pydicom keeps an empty type-2 value as None
        self._anonymizer.anonymize(ds)
        for keyword in EMPTY:
            if keyword in ds:
                ds[keyword].value = ""
        if self.dates == "remove":
            ds.walk(_empty_dates)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = self.method
        codes = [BASIC_PROFILE] + ([MODIFIED_DATES] if self.dates == "shift" else [])
        ds.DeidentificationMethodCodeSequence = pydicom.Sequence([_code(value, meaning) for value, meaning in codes])
        return ds


def _code(value: str, meaning: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def _none_to_empty(ds: pydicom.Dataset, element: pydicom.DataElement) -> None:
    if element.value is None and element.VR in ("LO", "SH", "PN", "CS", "DA", "DT", "TM", "LT", "ST", "UT", "UI"):
        element.value = ""


def _empty_dates(ds: pydicom.Dataset, element: pydicom.DataElement) -> None:
    if element.VR in _DATE_VRS:
        element.value = ""
