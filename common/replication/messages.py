"""Replication wire messages: frozen dataclasses and their strict msgpack encoding.

A frame body is one msgpack map: key "t" holds the message's type name, the other keys are
exactly the dataclass's fields. A message validates every field when it is constructed, so an
invalid message cannot exist: building one is our bug (LocalProtocolError), decoding one from
the peer is theirs (RemoteProtocolError). Either error names the message and the field.

    secondary ── Hello ───────► primary        (first message, exactly once)
              ◄── Welcome | Refuse | Swapped    (Swapped: a swap made that site the secondary)
              ── ReadJournal ─►                 (one request outstanding at a time)
              ◄── JournalBatch | Refuse
              ── ReportBitmap ►                 (after Welcome: one per volume)
              ◄── BitmapTaken | Refuse
              ── SwapRequest ─►                 (resync --swap, takeover: the roles change)
              ◄── SwapAnswer | Refuse
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields
from typing import Any, Final

import msgpack

PROTOCOL_VERSION: Final = 3  # 3: Swapped

U32_MAX: Final = (1 << 32) - 1
U64_MAX: Final = (1 << 64) - 1
MAX_NAME_CHARS: Final = 255
MAX_REASON_CHARS: Final = 1024
# A journal group of more volumes than this is not one consistency group anyone runs; the bound
# keeps a Hello or Welcome well inside the 2 MiB control frame (a test checks the worst case).
MAX_VOLUMES: Final = 1024
# The most a JournalBatch adds around its records: keys, seven integers, a 255-character state.
MAX_BATCH_ENVELOPE_BYTES: Final = 4096

_MAX_STR_BYTES: Final = 4 * MAX_REASON_CHARS  # UTF-8 spends at most 4 bytes per character
_MAX_MAP_ENTRIES: Final = 16  # the largest message has 9 keys
# msgpack's limits are per container; nested containers multiply them. A frame holds at most
# the message map, its keys and values, and per volume a map of two keys and two values.
_MAX_OBJECTS: Final = 1 + 2 * _MAX_MAP_ENTRIES + MAX_VOLUMES * 5
_BIN8, _BIN16, _BIN32 = struct.Struct(">BB"), struct.Struct(">BH"), struct.Struct(">BI")
# The msgpack headers _check_object_count reads, by type byte (the fix* ranges aside): the
# bytes after a scalar of fixed size; the bytes of the length of a str or bin, or of an ext
# (whose type byte follows); the bytes of the count of an array or map.
_FIXED_BYTES: Final = {
    0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,
    0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,
}  # fmt: skip
_LENGTH_BYTES: Final = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
_EXT_LENGTH_BYTES: Final = {0xC7: 1, 0xC8: 2, 0xC9: 4}
_COUNT_BYTES: Final = {0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}


class RefuseCode(enum.StrEnum):
    """Why the primary refused; it closes the connection after a Refuse."""

    VERSION = "version"
    GROUP = "group"
    NEEDS_COPY = "needs_copy"
    BUSY = "busy"
    NOT_PRIMARY = "not_primary"
    BAD_REQUEST = "bad_request"


_REFUSE_CODES: Final = frozenset(code.value for code in RefuseCode)


class LocalProtocolError(Exception):
    """We misused the protocol core or built an invalid message (a bug on this side)."""


class RemoteProtocolError(Exception):
    """The peer broke the protocol: log it and close the connection.

    `refuse_code` is the code a primary may put in a last Refuse before closing (the way h11's
    RemoteProtocolError carries an error_status_hint).
    """

    def __init__(self, message: str, refuse_code: RefuseCode = RefuseCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.refuse_code = refuse_code


# -- field checks (raise LocalProtocolError; decode turns it into RemoteProtocolError) ----------


def _uint(field: str, value: object, *, low: int = 0, high: int = U64_MAX) -> int:
    # `type(...) is int` because bool is an int subclass: a peer's `true` is not the seq 1.
    if type(value) is not int:
        raise LocalProtocolError(f"{field} must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise LocalProtocolError(f"{field} {value} is out of range [{low}, {high}]")
    return value


def _text(field: str, value: object, *, max_chars: int = MAX_NAME_CHARS, empty: bool) -> None:
    if not isinstance(value, str):
        raise LocalProtocolError(f"{field} must be a string, not {type(value).__name__}")
    if len(value) > max_chars:
        raise LocalProtocolError(f"{field} has {len(value)} characters, at most {max_chars}")
    if not value and not empty:
        raise LocalProtocolError(f"{field} must not be empty")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate: msgpack could not send it
            raise LocalProtocolError(f"{field} is not valid Unicode text") from None


def _volumes(field: str, value: object) -> None:
    if type(value) is not tuple:
        raise LocalProtocolError(f"{field} must be a tuple, not {type(value).__name__}")
    if len(value) > MAX_VOLUMES:
        raise LocalProtocolError(f"{field} has {len(value)} volumes, at most {MAX_VOLUMES}")
    names: set[str] = set()
    for i, volume in enumerate(value):
        if not isinstance(volume, VolumeDesc):
            raise LocalProtocolError(f"{field}[{i}] must be a VolumeDesc")
        if volume.name in names:
            raise LocalProtocolError(f"{field}[{i}].name {volume.name!r} appears twice")
        names.add(volume.name)


# -- messages ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VolumeDesc:
    name: str
    size: int

    def __post_init__(self) -> None:
        _text("name", self.name, empty=False)
        _uint("size", self.size)


class _Message:
    """Validation hook shared by the messages: the error says which message it was."""

    __slots__ = ()

    def __post_init__(self) -> None:
        try:
            self._validate()
        except LocalProtocolError as exc:
            raise LocalProtocolError(f"{type(self).__name__}: {exc}") from None

    def _validate(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Hello(_Message):
    """Secondary -> primary, first and once. generation "" = never paired.

    state is the secondary's pair state: a primary that still journals learns from "SSWS" that
    the secondary took over. svol_written says hosts wrote the S-VOLs while SSWS (with the
    primary's own writes while suspended, that is a split brain). failure says why the
    secondary can no longer store or apply the journal (its restore journal or S-VOL disk
    failed): a primary that still journals suspends (PSUE); "" = no failure.
    """

    version: int
    group: str
    generation: str
    restored_seq: int
    applied_seq: int
    volumes: tuple[VolumeDesc, ...]
    state: str = "SMPL"
    svol_written: bool = False
    failure: str = ""

    def _validate(self) -> None:
        _version(self.version)
        _text("group", self.group, empty=False)
        _text("generation", self.generation, empty=True)
        _positions(self.restored_seq, self.applied_seq)
        _volumes("volumes", self.volumes)
        _text("state", self.state, empty=False)
        _bool("svol_written", self.svol_written)
        _text("failure", self.failure, max_chars=MAX_REASON_CHARS, empty=True)


@dataclass(frozen=True, slots=True)
class ReadJournal(_Message):
    """Secondary -> primary: send me entries from from_seq on (the only request).

    restored_seq is the highest seq durable in the restore journal (the primary may release
    up to it: invariant 3); applied_seq the highest destaged to the S-VOLs (for lag);
    svol_written as in Hello, kept current while SSWS (split-brain detection).
    """

    from_seq: int
    max_entries: int
    max_bytes: int
    max_wait_ms: int
    restored_seq: int
    applied_seq: int
    svol_written: bool = False

    def _validate(self) -> None:
        _uint("from_seq", self.from_seq, low=1)
        _uint("max_entries", self.max_entries, low=1, high=U32_MAX)
        _uint("max_bytes", self.max_bytes, low=1, high=U32_MAX)
        _uint("max_wait_ms", self.max_wait_ms, high=U32_MAX)
        _positions(self.restored_seq, self.applied_seq)
        _bool("svol_written", self.svol_written)


@dataclass(frozen=True, slots=True)
class ReportBitmap(_Message):
    """Secondary -> primary, after Welcome, one per volume: the secondary's difference bitmap
    (common.bitmap's serialized form), which the primary merges into its own: a resync copies
    the union. The secondary clears it once BitmapTaken says the primary persisted it."""

    generation: str
    volume: str
    bitmap: bytes

    def _validate(self) -> None:
        _text("generation", self.generation, empty=True)
        _text("volume", self.volume, empty=False)
        if type(self.bitmap) is not bytes:
            raise LocalProtocolError(f"bitmap must be bytes, not {type(self.bitmap).__name__}")


@dataclass(frozen=True, slots=True)
class BitmapTaken(_Message):
    """Primary -> secondary, answers ReportBitmap: merged and persisted on the primary."""

    volume: str

    def _validate(self) -> None:
        _text("volume", self.volume, empty=False)


class SwapKind(enum.StrEnum):
    """The steps of a role swap the secondary asks for (see primaryd.group / secondaryd.group).

    RESYNC: the secondary is SSWS and becomes the primary; the primary becomes its secondary.
    TAKEOVER: the pair is PAIR; the primary stops host writes and answers its last seq, which
    the secondary then applies before it asks COMMIT, when the primary becomes the secondary.
    """

    RESYNC = "resync"
    TAKEOVER = "takeover"
    COMMIT = "commit"


_SWAP_KINDS: Final = frozenset(kind.value for kind in SwapKind)


@dataclass(frozen=True, slots=True)
class SwapRequest(_Message):
    """Secondary -> primary: one step of a role swap."""

    kind: SwapKind

    def _validate(self) -> None:
        _swap_kind(self)


@dataclass(frozen=True, slots=True)
class SwapAnswer(_Message):
    """Primary -> secondary, answers SwapRequest: done; last_seq is the primary's last journal
    seq (for TAKEOVER: no host write comes after it)."""

    kind: SwapKind
    last_seq: int

    def _validate(self) -> None:
        _swap_kind(self)
        _uint("last_seq", self.last_seq)


@dataclass(frozen=True, slots=True)
class Swapped(_Message):
    """Old primary -> secondary, answers Hello: this site is the primary no more. The swap step
    `kind` (COMMIT of a takeover, or RESYNC) that the secondary of `generation` asked for made
    it the secondary, its master journal ending at `last_seq`; the answer to that step may
    have been lost. That secondary finishes the swap (secondaryd.group); then the site closes.
    """

    group: str
    generation: str
    last_seq: int
    kind: SwapKind

    def _validate(self) -> None:
        _text("group", self.group, empty=False)
        _text("generation", self.generation, empty=False)
        _uint("last_seq", self.last_seq)
        _swap_kind(self)
        if self.kind is SwapKind.TAKEOVER:
            raise LocalProtocolError("kind takeover does not switch roles: commit or resync")


def _swap_kind(message: SwapRequest | SwapAnswer | Swapped) -> None:
    if not isinstance(message.kind, str) or message.kind not in _SWAP_KINDS:
        raise LocalProtocolError(f"kind {message.kind!r} is not one of {[*SwapKind]}")
    object.__setattr__(message, "kind", SwapKind(message.kind))


@dataclass(frozen=True, slots=True)
class Welcome(_Message):
    """Primary -> secondary, answers Hello.

    start_seq is the first seq of this generation (where a secondary of another generation
    starts, after a copy); first_seq..last_seq is what the master journal holds (empty when
    first_seq == last_seq + 1). state (here and in JournalBatch) is the pair state the
    secondary is to show: the primary's, as the secondary names it (PSUS is SSUS there; SSWS
    after split --rw), see common.pairstate.secondary_view. site_id is the primary site's
    identity (common.siteid): a paired secondary follows no other ("" = unknown).
    """

    version: int
    group: str
    generation: str
    start_seq: int
    first_seq: int
    last_seq: int
    state: str
    volumes: tuple[VolumeDesc, ...]
    site_id: str = ""

    def _validate(self) -> None:
        _version(self.version)
        _text("group", self.group, empty=False)
        _text("generation", self.generation, empty=False)
        _uint("start_seq", self.start_seq, low=1)
        _uint("first_seq", self.first_seq, low=1)
        _uint("last_seq", self.last_seq)
        if self.first_seq > self.last_seq + 1:
            raise LocalProtocolError(f"first_seq {self.first_seq} > last_seq {self.last_seq} + 1")
        if self.start_seq > self.last_seq + 1:
            raise LocalProtocolError(f"start_seq {self.start_seq} > last_seq {self.last_seq} + 1")
        _text("state", self.state, empty=False)
        _volumes("volumes", self.volumes)
        _text("site_id", self.site_id, empty=True)


@dataclass(frozen=True, slots=True)
class Refuse(_Message):
    """Primary -> secondary, answers Hello or ReadJournal; the primary then closes."""

    code: RefuseCode
    reason: str

    def _validate(self) -> None:
        if not isinstance(self.code, str) or self.code not in _REFUSE_CODES:
            raise LocalProtocolError(f"code {self.code!r} is not one of {[*RefuseCode]}")
        # Normalise a plain "busy" to RefuseCode.BUSY so that equal messages compare equal.
        object.__setattr__(self, "code", RefuseCode(self.code))
        _text("reason", self.reason, max_chars=MAX_REASON_CHARS, empty=True)


@dataclass(frozen=True, slots=True)
class JournalBatch(_Message):
    """Primary -> secondary, answers ReadJournal: `count` journal records, concatenated.

    `records` is opaque here (the journal module encodes it). first_seq echoes the request's
    from_seq. count 0 is the long-poll timeout answer and still carries the primary's status.
    """

    first_seq: int
    count: int
    records: bytes
    last_seq: int
    state: str
    copy_done_bytes: int
    copy_total_bytes: int
    primary_time_ns: int

    def _validate(self) -> None:
        _uint("first_seq", self.first_seq, low=1)
        _uint("count", self.count, high=U32_MAX)
        if type(self.records) is not bytes:
            raise LocalProtocolError(f"records must be bytes, not {type(self.records).__name__}")
        if len(self.records) > U32_MAX:  # msgpack's largest bin
            raise LocalProtocolError(f"records of {len(self.records)} bytes, at most {U32_MAX}")
        _uint("last_seq", self.last_seq)
        _text("state", self.state, empty=False)
        _uint("copy_done_bytes", self.copy_done_bytes)
        _uint("copy_total_bytes", self.copy_total_bytes)
        _uint("primary_time_ns", self.primary_time_ns)
        self._check_consistent()

    def _check_consistent(self) -> None:
        # Every record encoding takes at least a byte, so count <= len(records) always holds.
        if (self.count == 0) != (not self.records) or self.count > len(self.records):
            raise LocalProtocolError(f"count {self.count} with {len(self.records)} record bytes")
        if self.first_seq + self.count - 1 > self.last_seq:
            raise LocalProtocolError(
                f"first_seq {self.first_seq} + count {self.count} runs past last_seq "
                f"{self.last_seq}"
            )
        if self.copy_done_bytes > self.copy_total_bytes:
            raise LocalProtocolError(
                f"copy_done_bytes {self.copy_done_bytes} > copy_total_bytes {self.copy_total_bytes}"
            )


def _version(value: object) -> None:
    _uint("version", value)
    if value != PROTOCOL_VERSION:
        raise LocalProtocolError(f"version {value} is not {PROTOCOL_VERSION}")


def _bool(field: str, value: object) -> None:
    if type(value) is not bool:
        raise LocalProtocolError(f"{field} must be a boolean, not {type(value).__name__}")


def _positions(restored_seq: object, applied_seq: object) -> None:
    restored = _uint("restored_seq", restored_seq)
    applied = _uint("applied_seq", applied_seq)
    # Entries reach the S-VOLs only through the restore journal.
    if applied > restored:
        raise LocalProtocolError(f"applied_seq {applied_seq} > restored_seq {restored_seq}")


Message = (
    Hello
    | ReadJournal
    | Welcome
    | Refuse
    | JournalBatch
    | ReportBitmap
    | BitmapTaken
    | SwapRequest
    | SwapAnswer
    | Swapped
)
MESSAGE_TYPES: Final = (
    Hello,
    ReadJournal,
    Welcome,
    Refuse,
    JournalBatch,
    ReportBitmap,
    BitmapTaken,
    SwapRequest,
    SwapAnswer,
    Swapped,
)
_BY_NAME: Final[dict[str, type[Message]]] = {cls.__name__: cls for cls in MESSAGE_TYPES}
_FIELDS: Final[dict[type[Message], tuple[str, ...]]] = {
    cls: tuple(f.name for f in fields(cls)) for cls in MESSAGE_TYPES
}


# -- encoding ------------------------------------------------------------------------------------


def encode_chunks(message: Message) -> list[bytes]:
    """The msgpack body as pieces that join into one standard msgpack map.

    A bytes field is emitted as a bin header plus the caller's own bytes object, so framing a
    JournalBatch copies its records once (in the join) instead of three times (packer buffer,
    packb result, prefix concatenation).
    """
    packer = msgpack.Packer(use_bin_type=True)
    items = _wire_items(message)
    chunks: list[bytes] = [packer.pack_map_header(len(items))]
    for key, value in items:
        chunks.append(packer.pack(key))
        if isinstance(value, bytes):
            chunks += (_bin_header(len(value)), value)
        else:
            chunks.append(packer.pack(value))
    return chunks


def encode(message: Message) -> bytes:
    """The msgpack body of one message (without the frame's length prefix)."""
    return b"".join(encode_chunks(message))


def _wire_items(message: Message) -> list[tuple[str, object]]:
    items: list[tuple[str, object]] = [("t", type(message).__name__)]
    for name in _FIELDS[type(message)]:
        value = getattr(message, name)
        if name == "volumes":
            value = [{"name": v.name, "size": v.size} for v in value]
        elif isinstance(value, RefuseCode | SwapKind):
            value = value.value
        items.append((name, value))
    return items


def _bin_header(length: int) -> bytes:
    if length <= 0xFF:
        return _BIN8.pack(0xC4, length)
    if length <= 0xFFFF:
        return _BIN16.pack(0xC5, length)
    return _BIN32.pack(0xC6, length)


# -- decoding ------------------------------------------------------------------------------------


def decode(body: bytes | bytearray | memoryview, *, max_bin_bytes: int = U32_MAX) -> Message:
    """Parse and validate one frame body from the peer; RemoteProtocolError if anything is off.

    `body` is only read during the call (bin values are copied out), so it may be a view into
    the connection's receive buffer.
    """
    wire = _unpack(body, max_bin_bytes)
    cls = _message_class(wire)
    _check_wire_version(cls, wire)
    _check_keys(cls, wire)
    kwargs: dict[str, Any] = {name: wire[name] for name in _FIELDS[cls]}
    try:
        if "volumes" in kwargs:
            kwargs["volumes"] = _volumes_from_wire(kwargs["volumes"])
        return cls(**kwargs)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(_prefixed(cls, str(exc))) from None


def _unpack(body: bytes | bytearray | memoryview, max_bin_bytes: int) -> dict[str, object]:
    _check_object_count(body)
    try:
        wire: object = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            object_pairs_hook=_unique_keys,
            max_str_len=_MAX_STR_BYTES,
            max_bin_len=max_bin_bytes,
            max_array_len=MAX_VOLUMES,
            max_map_len=_MAX_MAP_ENTRIES,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as exc:
        # ValueError covers ExtraData, FormatError, StackError, bad UTF-8 and the length limits.
        detail = str(exc) or type(exc).__name__  # FormatError comes without a message
        raise RemoteProtocolError(f"frame is not valid msgpack: {detail}") from None
    if not isinstance(wire, dict):
        raise RemoteProtocolError(f"frame holds a msgpack {type(wire).__name__}, not a map")
    return wire


def _check_object_count(body: bytes | bytearray | memoryview) -> None:
    """Refuse a frame of more objects than any message has, before msgpack builds them.

    Each one costs ~50-70 bytes in Python for as little as one on the wire (an empty array):
    nested, 2 MiB of them would cost ~130 MiB to decode. Only the headers are read (a str or
    bin is skipped by its length); anything else wrong is left for msgpack to report.
    """
    pending, pos, seen = 1, 0, 0  # objects announced but not yet read
    while pending and pos < len(body):
        seen += 1
        if seen > _MAX_OBJECTS:
            raise RemoteProtocolError(f"frame holds more than {_MAX_OBJECTS} msgpack objects")
        pending -= 1
        kind = body[pos]
        pos += 1
        if 0x80 <= kind <= 0x8F:
            pending += 2 * (kind & 0x0F)
        elif 0x90 <= kind <= 0x9F:
            pending += kind & 0x0F
        elif 0xA0 <= kind <= 0xBF:
            pos += kind & 0x1F
        elif kind in _FIXED_BYTES:
            pos += _FIXED_BYTES[kind]
        elif kind in _COUNT_BYTES:
            size = _COUNT_BYTES[kind]
            count = int.from_bytes(body[pos : pos + size], "big")
            pending += 2 * count if kind >= 0xDE else count
            pos += size
        elif kind in _LENGTH_BYTES:
            size = _LENGTH_BYTES[kind]
            pos += size + int.from_bytes(body[pos : pos + size], "big")
        elif kind in _EXT_LENGTH_BYTES:
            size = _EXT_LENGTH_BYTES[kind]
            pos += size + 1 + int.from_bytes(body[pos : pos + size], "big")
        # else a fixint, nil, a bool, or 0xC1 (which msgpack refuses)


def _unique_keys(pairs: list[tuple[object, object]]) -> dict[object, object]:
    # strict_map_key still lets bin keys through; and msgpack would keep the last of two equal
    # keys, where a peer that sends both is confused.
    if not all(isinstance(key, str) for key, _ in pairs):
        raise ValueError("a map key is not a string")
    wire = dict(pairs)
    if len(wire) != len(pairs):
        raise ValueError("a map repeats a key")
    return wire


def _message_class(wire: dict[str, object]) -> type[Message]:
    name = wire.get("t")
    if not isinstance(name, str):
        raise RemoteProtocolError(f"message type 't' must be a string, not {type(name).__name__}")
    cls = _BY_NAME.get(name)
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {_short(name)}")
    return cls


def _check_wire_version(cls: type[Message], wire: dict[str, object]) -> None:
    # Checked before the other keys: another version may well have other fields, and the
    # primary should answer it with Refuse(version), not bad_request.
    version = wire.get("version", PROTOCOL_VERSION)
    if "version" in _FIELDS[cls] and type(version) is int and version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            _prefixed(
                cls, f"version {version} is not supported (this side speaks {PROTOCOL_VERSION})"
            ),
            RefuseCode.VERSION,
        )


def _check_keys(cls: type[Message], wire: dict[str, object]) -> None:
    expected = {"t", *_FIELDS[cls]}
    missing = [name for name in _FIELDS[cls] if name not in wire]
    if missing:
        raise RemoteProtocolError(_prefixed(cls, f"missing field {', '.join(missing)}"))
    extra = [_short(key) for key in wire if key not in expected]
    if extra:
        raise RemoteProtocolError(_prefixed(cls, f"unknown field {', '.join(extra)}"))


def _volumes_from_wire(value: object) -> tuple[VolumeDesc, ...]:
    if not isinstance(value, list):
        raise LocalProtocolError(f"volumes must be an array, not {type(value).__name__}")
    return tuple(_volume_from_wire(i, item) for i, item in enumerate(value))


def _volume_from_wire(index: int, item: object) -> VolumeDesc:
    if not isinstance(item, dict) or set(item) != {"name", "size"}:
        raise LocalProtocolError(f"volumes[{index}] must be a map of exactly name and size")
    try:
        return VolumeDesc(item["name"], item["size"])
    except LocalProtocolError as exc:
        raise LocalProtocolError(f"volumes[{index}].{exc}") from None


def _prefixed(cls: type[Message], text: str) -> str:
    prefix = f"{cls.__name__}: "
    return text if text.startswith(prefix) else prefix + text


def _short(text: str) -> str:
    """A peer's string, quoted and cut short enough for a log line."""
    return repr(text[:64] + "..." if len(text) > 64 else text)
