"""Fetch a series from a PACS for an HTTP dataset: C-MOVE to our own node, or C-GET over one association.

PlatiPy's ``dicom_retrieve`` MOVE and GET. A MOVE only asks: the instances arrive at the node by C-STORE
from the PACS and complete there like any pushed series. A GET receives them on its own association,
into a folder the caller then files.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

from .checks import is_uid
from .config import Destination
from .tls import TlsFiles

log = logging.getLogger(__name__)

_PENDING = {0xFF00, 0xFF01}
_OK = {0x0000}
_WARNING = {0xB000}
# The image types a series for an algorithm may hold; C-GET needs each one proposed with the SCP role.
_GET_STORAGE = ("CTImageStorage", "MRImageStorage", "PositronEmissionTomographyImageStorage",
                "EnhancedCTImageStorage", "EnhancedMRImageStorage", "SecondaryCaptureImageStorage",
                "RTStructureSetStorage", "SegmentationStorage", "RTDoseStorage",
                "DigitalXRayImageStorageForPresentation", "UltrasoundImageStorage", "NuclearMedicineImageStorage")


class RetrieveFailed(Exception):
    """The PACS did not give the series; the reason says why."""


def _associate(ae: Any, loc: Destination, tls: TlsFiles | None, **kw: Any) -> Any:
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    tls_args = (tls.client_context(), loc.host) if tls is not None else None  # the peer's name checked
    assoc = ae.associate(loc.host, loc.port, ae_title=loc.ae_title, tls_args=tls_args, **kw)
    if not assoc.is_established:
        raise RetrieveFailed(f"no association with {loc.ae_title}@{loc.host}:{loc.port}")
    return assoc


def find_study(loc: Destination, series_uid: str, *, calling_ae: str, tls: TlsFiles | None = None) -> str:
    """The StudyInstanceUID of ``series_uid`` at the PACS (a SERIES-level C-FIND, Study Root)."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.SeriesInstanceUID = series_uid
    query.StudyInstanceUID = ""
    assoc = _associate(ae, loc, tls)
    studies = set()
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code in _PENDING and identifier is not None and identifier.get("StudyInstanceUID"):
                studies.add(str(identifier.StudyInstanceUID))
            elif code is None or code not in _OK | _PENDING:
                raise RetrieveFailed(f"C-FIND for series {series_uid} failed at {loc.ae_title}: status "
                                     f"{'none' if code is None else hex(code)}")
    finally:
        if assoc.is_established:
            assoc.release()
    if len(studies) != 1:
        raise RetrieveFailed(f"{loc.ae_title} has {'no' if not studies else 'more than one'} study with series "
                             f"{series_uid}")
    return studies.pop()


def _identifier(series_uid: str, study_uid: str) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    return ds


def _check(responses: Any, what: str, loc: Destination) -> int:
    completed = 0
    for status, _identifier in responses:
        code = getattr(status, "Status", None)
        if code in _PENDING:
            continue
        if code is None:
            raise RetrieveFailed(f"{what} from {loc.ae_title}: the connection was lost")
        completed = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
        failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
        if code not in _OK | _WARNING or failed:
            raise RetrieveFailed(f"{what} from {loc.ae_title} failed: status {hex(code)}, {failed} failed, "
                                 f"{completed} completed")
    return completed


def move_series(loc: Destination, series_uid: str, *, destination_ae: str, calling_ae: str,
                tls: TlsFiles | None = None) -> int:
    """Ask the PACS to C-STORE the series to ``destination_ae`` (our node); returns the instances moved."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]

    study_uid = find_study(loc, series_uid, calling_ae=calling_ae, tls=tls)
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = _associate(ae, loc, tls)
    try:
        n = _check(assoc.send_c_move(_identifier(series_uid, study_uid), destination_ae,
                                     StudyRootQueryRetrieveInformationModelMove), "C-MOVE", loc)
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("retrieve: %s moved %d instance(s) of series %s to %s", loc.ae_title, n, series_uid, destination_ae)
    return n


def get_series(loc: Destination, series_uid: str, out_dir: Path, *, calling_ae: str,
               tls: TlsFiles | None = None) -> int:
    """C-GET the series into ``out_dir`` (each instance written whole, then renamed); returns the count."""
    from pydicom import uid as _uid
    from pynetdicom import AE, build_role, evt, sop_class
    from pynetdicom.dsutils import encode_file_meta

    study_uid = find_study(loc, series_uid, calling_ae=calling_ae, tls=tls)
    ae = AE(ae_title=calling_ae)
    model = sop_class.StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]
    ae.add_requested_context(model)
    roles = []
    for name in _GET_STORAGE:
        uid = getattr(sop_class, name)
        ae.add_requested_context(uid, [_uid.ExplicitVRLittleEndian, _uid.ImplicitVRLittleEndian])
        roles.append(build_role(uid, scp_role=True))
    out_dir.mkdir(parents=True, exist_ok=True)

    def on_store(event: Any) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        if not is_uid(sop):  # it becomes a file name
            return 0xC000
        tmp = out_dir / f".{sop}.{secrets.token_hex(3)}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta))
            fh.write(event.encoded_dataset(include_meta=False))
        os.replace(tmp, out_dir / f"{sop}.dcm")
        return 0x0000

    assoc = _associate(ae, loc, tls, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        n = _check(assoc.send_c_get(_identifier(series_uid, study_uid), model), "C-GET", loc)
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("retrieve: got %d instance(s) of series %s from %s", n, series_uid, loc.ae_title)
    return n
