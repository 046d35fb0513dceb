"""Batch reconstruction of folders (`medldm reconstruct`): ``units`` turns an input tree into units of work,
``outputs`` reads one unit and writes its results, ``manifest`` keeps the record a resumed run reads, and
``run`` drives them (``run_batch``)."""

from medldm.batch.manifest import exit_code, format_table, merge_rank_manifests, previous_parameters, read_previous
from medldm.batch.run import run_batch
from medldm.batch.units import discover

__all__ = ["run_batch", "discover", "exit_code", "format_table", "merge_rank_manifests", "previous_parameters",
           "read_previous"]
