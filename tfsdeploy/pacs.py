"""Sending a written DICOM series to a PACS: C-STORE over one association (pynetdicom), or DICOMweb
STOW-RS (one HTTP request, the standard library).

C-STORE: the destination is `AE@HOST:PORT`, the PACS's (called) AE title and its DICOM port; the
calling AE title names this end. Every file is offered in its own SOP class and transfer syntax.
STOW-RS: the destination is the DICOMweb root (`http://host:8042/dicom-web`); the files go to
ROOT/studies as one multipart/related request, and the answer lists the instances stored.

A PACS that cannot be reached, refuses the association, drops it or rejects an instance is one
UserError naming what failed and how many instances it had stored; what was written stays on disk,
and only instances the PACS confirmed count as sent.

C-STORE needs the optional extra `tfsdeploy[dicom]` (pynetdicom); imported on first use.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from tfsdeploy.errors import UserError
from tfsdeploy.volumes import DICOM_EXTRA, import_extra

DEFAULT_CALLING_AE = "TFSDEPLOY"
TIMEOUT_S = 30.0  # connecting, association and each response
_AE_CHARS = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII less the backslash, 1 to 16


def check_ae_title(title: str, option: str) -> str:
    """An AE title as DICOM allows it (1 to 16 printable ASCII characters, no backslash, not only spaces)."""
    if not _AE_CHARS.match(title) or not title.strip():
        raise UserError(f"{option} {title!r}: an AE title has 1 to 16 printable ASCII characters, no backslash")
    return title.strip()


@dataclass(frozen=True)
class Destination:
    """A DICOM node: its AE title, host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, option: str = "--send") -> Destination:
        """`AE@HOST:PORT` (an IPv6 host in brackets: AE@[::1]:104)."""
        match = re.fullmatch(r"(?P<ae>[^@]*)@(?P<host>\[[^\]]+\]|[^:@\[\]]+):(?P<port>\d{1,5})", text.strip())
        if match is None:
            raise UserError(f"{option} takes AE@HOST:PORT, the PACS's AE title, host and DICOM port (got {text!r})")
        port = int(match["port"])
        if not 1 <= port <= 65535:
            raise UserError(f"{option} {text!r}: the port must be 1 to 65535")
        return cls(check_ae_title(match["ae"], option), match["host"].strip("[]"), port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def send_series(files: list[Path], dest: Destination, calling_ae: str = DEFAULT_CALLING_AE,
                timeout: float = TIMEOUT_S) -> int:
    """C-STORE every file to `dest` over one association; returns how many the PACS stored (all of them).

    A warning status (the PACS stored the instance, perhaps coerced) counts as stored; anything else
    stops nothing but is reported: after the last file, one UserError says what failed."""
    pydicom = import_extra("pydicom", "sending a DICOM series")
    pynetdicom = import_extra("pynetdicom", "sending a DICOM series", DICOM_EXTRA)
    if not files:
        raise ValueError("no files to send")
    datasets = [pydicom.dcmread(f) for f in files]
    ae = pynetdicom.AE(ae_title=calling_ae)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    offered = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    for sop_class, syntax in offered:
        ae.add_requested_context(sop_class, [syntax])
    total = len(files)
    # A refusal is told by the A-ASSOCIATE-RJ received, not only by the association's state: a PACS that
    # closes the connection right after refusing may leave the association marked as aborted instead.
    refusals: list = []

    def on_pdu(event) -> None:
        if type(event.pdu).__name__ == "A_ASSOCIATE_RJ":
            refusals.append(event.pdu)

    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         evt_handlers=[(pynetdicom.evt.EVT_PDU_RECV, on_pdu)])
    if not assoc.is_established:
        raise UserError(_not_associated(assoc, refusals, dest, calling_ae, total))
    stored, failures = 0, []
    try:
        for f, ds in zip(files, datasets, strict=True):
            if not assoc.is_established:
                failures.append((f, "the association was lost"))
                break
            try:
                status = assoc.send_c_store(ds)
            except ValueError:  # the PACS accepted no presentation context for the file's class and syntax
                failures.append((f, f"the PACS does not accept SOP class {ds.SOPClassUID} in "
                                    f"{ds.file_meta.TransferSyntaxUID.name}"))
                continue
            except RuntimeError as e:  # the association closed under it
                failures.append((f, str(e).splitlines()[0]))
                break
            code = int(status.get("Status", -1)) if status else -1
            if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
                stored += 1
            elif code == -1:
                failures.append((f, "no response (the association was aborted or timed out)"))
                break
            else:
                failures.append((f, f"status 0x{code:04X}{_status_text(pynetdicom, code)}"))
    finally:
        if assoc.is_established:
            assoc.release()
    if failures:
        f, why = failures[0]
        unsent = total - stored
        raise UserError(f"{dest} did not store {unsent} of {total} instance(s) ({f.name}: {why}); {stored} stored")
    return stored


def check_stow_url(url: str, option: str = "--stow") -> str:
    """A DICOMweb root: an http or https URL with a host, without query or fragment."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise UserError(f"{option} takes the DICOMweb root as an http(s) URL, e.g. http://pacs:8042/dicom-web "
                        f"(got {url!r})")
    return url.strip().rstrip("/")


def stow_series(files: list[Path], root: str, timeout: float = TIMEOUT_S) -> int:
    """POST every file to ROOT/studies in one STOW-RS request; returns how many the server stored (all).

    Counted as stored are the files whose SOP Instance UIDs the answer lists in its Referenced SOP
    Sequence; a failed request, or an answer that lists fewer, is one UserError."""
    pydicom = import_extra("pydicom", "sending a DICOM series")
    if not files:
        raise ValueError("no files to send")
    ours = [str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
            for f in files]
    boundary = f"tfsdeploy-{uuid.uuid4().hex}"
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes()
                    + b"\r\n" for f in files) + b"--" + boundary.encode() + b"--\r\n"
    url = f"{root}/studies"
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})
    total = len(files)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = response.read()
    except urllib.error.HTTPError as e:
        answer = e.read()
        stored = _stowed(answer, ours)
        raise UserError(f"{url} answered HTTP {e.code} {e.reason}{_failure(answer)}; {len(stored)} of {total} "
                        "instance(s) stored") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"{url}: cannot connect ({reason}); 0 of {total} instance(s) sent") from None
    stored = _stowed(answer, ours)
    if len(stored) < total:
        first = next(f for f, uid in zip(files, ours, strict=True) if uid not in stored)
        raise UserError(f"{url} did not store {total - len(stored)} of {total} instance(s) (e.g. {first.name})"
                        f"{_failure(answer)}; {len(stored)} stored")
    return total


def _stowed(answer: bytes, ours: list[str]) -> set[str]:
    """Our SOP Instance UIDs that a STOW-RS answer (DICOM JSON) lists as stored."""
    try:
        items = (json.loads(answer or b"{}").get("00081199") or {}).get("Value") or []
        listed = {str(v) for item in items for v in (item.get("00081155") or {}).get("Value") or []}
    except (ValueError, AttributeError, TypeError):  # not DICOM JSON: nothing confirmed
        return set()
    return listed & set(ours)


def _failure(answer: bytes) -> str:
    """', failure reason 0xA700 (and N more)' from a STOW-RS answer's Failed SOP Sequence, or ''."""
    try:
        data = json.loads(answer or b"{}")
        items = (data.get("00081198") or {}).get("Value") or []
        reasons = [int(v) for item in items for v in (item.get("00081197") or {}).get("Value") or []]
    except (ValueError, AttributeError, TypeError):
        return ""
    if not reasons:
        return ""
    return f", failure reason 0x{reasons[0]:04X}" + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else "")


def _not_associated(assoc, refusals: list, dest: Destination, calling_ae: str, total: int) -> str:
    if assoc.is_rejected or refusals:
        reason = f": {refusals[0].reason_str}" if refusals else ""
        return (f"{dest} refused the association from {calling_ae}{reason} (check the called and calling AE "
                f"titles); 0 of {total} instance(s) sent")
    return f"{dest}: cannot connect or associate (is the PACS running there?); 0 of {total} instance(s) sent"


def _status_text(pynetdicom, code: int) -> str:
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    found = STORAGE_SERVICE_CLASS_STATUS.get(code)
    if found is None and 0xC000 <= code <= 0xCFFF:
        return " Cannot understand"
    return f" {found[1]}" if found else ""


__all__ = ["Destination", "DEFAULT_CALLING_AE", "check_ae_title", "send_series", "check_stow_url", "stow_series"]
