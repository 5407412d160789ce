"""iSCSI text keys (RFC 7143 6, 13): key=value<NUL> pairs and the login negotiation.

Each key is one of a few kinds, and its answer follows from the kind:
    declarative   InitiatorName, TargetName, SessionType, ... (no answer, or our own value)
    list          HeaderDigest, DataDigest, AuthMethod: the first offered value we support
    boolean AND   ImmediateData, DataPDUInOrder, DataSequenceInOrder: Yes only if both say Yes
    boolean OR    InitialR2T: Yes if either says Yes
    numeric min   MaxBurstLength, FirstBurstLength, MaxConnections, ...: the smaller
    numeric max   DefaultTime2Wait: the larger
    MaxRecvDataSegmentLength is declared by each side for what it receives.
An unknown key is answered NotUnderstood; a malformed value is a protocol error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from common.iscsi.pdu import (
    MAX_DATA_SEGMENT_BYTES,
    MIN_RECV_DATA_SEGMENT_BYTES,
    RemoteProtocolError,
)

MAX_KEY_BYTES = 63
MAX_VALUE_BYTES = 8192
MAX_PAIRS = 128  # far more than any login sends; a bound on what one PDU sequence holds
MAX_TEXT_BYTES = 64 << 10  # a login or text request spread over continuation PDUs

Pairs = list[tuple[str, str]]


def parse_text(data: bytes) -> Pairs:
    """The key=value pairs of a text data segment (already joined across C-bit PDUs)."""
    if len(data) > MAX_TEXT_BYTES:
        raise RemoteProtocolError(f"{len(data)} bytes of text keys, more than {MAX_TEXT_BYTES}")
    if data and not data.endswith(b"\0"):
        raise RemoteProtocolError("text keys do not end with a NUL")
    pairs: Pairs = []
    seen: set[str] = set()
    for item in data.split(b"\0")[:-1]:
        if not item:
            continue  # tolerate stray NUL padding between pairs
        key_bytes, sep, value_bytes = item.partition(b"=")
        if not sep or not key_bytes:
            raise RemoteProtocolError(f"text item without key=value: {item[:64]!r}")
        if len(key_bytes) > MAX_KEY_BYTES or len(value_bytes) > MAX_VALUE_BYTES:
            raise RemoteProtocolError(f"text key or value too long: {key_bytes[:64]!r}")
        try:
            key, value = key_bytes.decode("ascii"), value_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(f"text key not ASCII/UTF-8: {key_bytes[:64]!r}") from exc
        if key in seen:
            raise RemoteProtocolError(f"text key {key} sent twice")
        seen.add(key)
        pairs.append((key, value))
        if len(pairs) > MAX_PAIRS:
            raise RemoteProtocolError(f"more than {MAX_PAIRS} text keys")
    return pairs


def encode_text(pairs: Sequence[tuple[str, str]]) -> bytes:
    return b"".join(f"{key}={value}".encode() + b"\0" for key, value in pairs)


@dataclass(frozen=True, slots=True)
class TargetLimits:
    """What this target accepts; the negotiation never gives the initiator more."""

    max_recv_data_segment_bytes: int = 256 << 10
    max_burst_bytes: int = 1 << 20
    first_burst_bytes: int = 256 << 10
    immediate_data: bool = True
    initial_r2t: bool = False  # No: an initiator asking for unsolicited Data-Out gets it
    # The digests we accept, best first; the initiator's order decides, except that
    # a target preferring CRC32C picks it whenever the initiator offers it.
    digests: tuple[str, ...] = ("None", "CRC32C")
    prefer_crc32c: bool = False
    default_time2wait_s: int = 2
    default_time2retain_s: int = 0


@dataclass(slots=True)
class SessionParams:
    """The operational parameters once negotiated (RFC 7143 defaults until then)."""

    header_digest: bool = False
    data_digest: bool = False
    # what the initiator receives: the most we may put in one PDU's data segment
    initiator_recv_data_segment_bytes: int = 8192
    max_burst_bytes: int = 262144
    first_burst_bytes: int = 65536
    immediate_data: bool = True
    initial_r2t: bool = True
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    max_outstanding_r2t: int = 1
    max_connections: int = 1
    error_recovery_level: int = 0
    default_time2wait_s: int = 2
    default_time2retain_s: int = 20
    initiator_name: str = ""
    target_name: str = ""
    session_type: str = "Normal"
    declared: dict[str, str] = field(default_factory=dict)


_DECLARATIVE = frozenset(
    ("InitiatorName", "InitiatorAlias", "TargetName", "SessionType", "TargetAlias")
)
_IGNORED_IN_OPERATIONAL = frozenset(("IFMarker", "OFMarker", "IFMarkInt", "OFMarkInt"))


def _number(key: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value, 0)
    except ValueError as exc:
        raise RemoteProtocolError(f"{key}={value[:32]}: not a number") from exc
    if not low <= number <= high:
        raise RemoteProtocolError(f"{key}={number}: outside {low}..{high}")
    return number


def _boolean(key: str, value: str) -> bool:
    if value not in ("Yes", "No"):
        raise RemoteProtocolError(f"{key}={value[:32]}: not Yes or No")
    return value == "Yes"


def _yes(flag: bool) -> str:
    return "Yes" if flag else "No"


class Negotiator:
    """Answers the initiator's keys during login; accumulates the result in `params`."""

    def __init__(self, limits: TargetLimits) -> None:
        self.limits = limits
        self.params = SessionParams()
        self.declared_own_mrdsl = False

    def answer(self, pairs: Pairs) -> Pairs:
        reply: Pairs = []
        for key, value in pairs:
            answer = self._answer_one(key, value)
            if answer is not None:
                reply.append((key, answer))
        return reply

    def own_declarations(self) -> Pairs:
        """MaxRecvDataSegmentLength for what we receive: declared once, in operational."""
        if self.declared_own_mrdsl:
            return []
        self.declared_own_mrdsl = True
        return [("MaxRecvDataSegmentLength", str(self.limits.max_recv_data_segment_bytes))]

    def _answer_one(self, key: str, value: str) -> str | None:
        p = self.params
        if key in _DECLARATIVE:
            p.declared[key] = value
            if key == "InitiatorName":
                p.initiator_name = value
            elif key == "TargetName":
                p.target_name = value
            elif key == "SessionType":
                if value not in ("Discovery", "Normal"):
                    raise RemoteProtocolError(f"SessionType={value[:32]}")
                p.session_type = value
            return None
        if key in ("HeaderDigest", "DataDigest"):
            chosen = self._choose_digest(key, value)
            setattr(p, "header_digest" if key == "HeaderDigest" else "data_digest", chosen)
            return "CRC32C" if chosen else "None"
        if key == "AuthMethod":
            return "None" if "None" in value.split(",") else "Reject"
        if key == "MaxRecvDataSegmentLength":
            p.initiator_recv_data_segment_bytes = _number(
                key, value, MIN_RECV_DATA_SEGMENT_BYTES, MAX_DATA_SEGMENT_BYTES
            )
            return None  # declarative: ours goes in own_declarations()
        return self._answer_operational(key, value)

    def _answer_operational(self, key: str, value: str) -> str | None:
        p, lim = self.params, self.limits
        if key == "MaxBurstLength":
            p.max_burst_bytes = min(
                _number(key, value, 512, MAX_DATA_SEGMENT_BYTES), lim.max_burst_bytes
            )
            return str(p.max_burst_bytes)
        if key == "FirstBurstLength":
            offered = _number(key, value, 512, MAX_DATA_SEGMENT_BYTES)
            p.first_burst_bytes = min(offered, lim.first_burst_bytes)
            return str(p.first_burst_bytes)
        if key == "ImmediateData":
            p.immediate_data = _boolean(key, value) and lim.immediate_data
            return _yes(p.immediate_data)
        if key == "InitialR2T":  # OR: unsolicited Data-Out only if both sides say No
            p.initial_r2t = _boolean(key, value) or lim.initial_r2t
            return _yes(p.initial_r2t)
        if key in ("DataPDUInOrder", "DataSequenceInOrder"):
            result = _boolean(key, value)  # AND with our Yes
            setattr(
                p,
                "data_pdu_in_order" if key == "DataPDUInOrder" else "data_sequence_in_order",
                result,
            )
            return _yes(result)
        if key in ("MaxConnections", "MaxOutstandingR2T"):
            _number(key, value, 1, 65535)
            return "1"  # one connection a session, one R2T at a time
        if key == "ErrorRecoveryLevel":
            _number(key, value, 0, 2)
            p.error_recovery_level = 0
            return "0"
        if key == "DefaultTime2Wait":
            p.default_time2wait_s = max(_number(key, value, 0, 3600), lim.default_time2wait_s)
            return str(p.default_time2wait_s)
        if key == "DefaultTime2Retain":
            p.default_time2retain_s = min(_number(key, value, 0, 3600), lim.default_time2retain_s)
            return str(p.default_time2retain_s)
        if key in _IGNORED_IN_OPERATIONAL:
            return "Irrelevant"
        return "NotUnderstood"

    def _choose_digest(self, key: str, value: str) -> bool:
        offered = [item.strip() for item in value.split(",")]
        supported = [item for item in offered if item in self.limits.digests]
        if not supported:
            raise RemoteProtocolError(f"{key}={value[:64]}: no digest we support")
        if self.limits.prefer_crc32c and "CRC32C" in supported:
            return True
        return supported[0] == "CRC32C"
