"""NBD_OPT_STARTTLS in the sans-I/O NBD core (proto.md "TLS support"), without sockets.

The modes: OFF answers STARTTLS with ERR_POLICY and never says TLS_REQD; REQUIRE (FORCEDTLS)
answers every option but STARTTLS and ABORT with ERR_TLS_REQD and closes on EXPORT_NAME;
OPTIONAL lets the client choose. After the ACK no plaintext byte is ever parsed as an option.
The last tests run a real TLS handshake through common.tlspipe against an ssl client, both
on memory BIOs: with the core behind it, and with common.nbd.sender's TLS reply stream,
which must hold one chunk in memory however much is queued.
"""

from __future__ import annotations

import contextlib
import hashlib
import ssl
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.nbd import constants as c
from common.nbd.protocol import (
    NEED_DATA,
    Disconnect,
    ExportChosen,
    ExportInfo,
    FileData,
    LocalProtocolError,
    NbdServerConnection,
    Outgoing,
    Phase,
    RemoteProtocolError,
    RequestRefused,
    StartTls,
    TlsMode,
    TlsRequired,
)
from common.nbd.sender import TLS_CHUNK_BYTES, ReplySender
from common.tlspipe import TlsPipe
from tests.unit.fuzzing import mutate, peak_traced

pytestmark = pytest.mark.timeout(60)

EXPORTS = {"vol0": ExportInfo("vol0", 1 << 20, False)}
FIXED = struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES)


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data


def go(name: str = "vol0") -> bytes:
    raw = name.encode()
    return option(c.Opt.GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))


def events_of(conn: NbdServerConnection, data: bytes) -> list[object]:
    conn.receive_data(data)
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def replies(conn: NbdServerConnection) -> list[tuple[int, int, bytes]]:
    """(option, reply type, payload) of every option reply queued, greeting skipped."""
    data = b"".join(bytes(b) for b in conn.data_to_send())
    if data.startswith(struct.pack(">Q", c.NBDMAGIC)):
        data = data[18:]
    out = []
    while data:
        magic, opt, rep, length = struct.unpack_from(">QIII", data)
        assert magic == c.OPTION_REPLY_MAGIC
        out.append((opt, rep, data[20 : 20 + length]))
        data = data[20 + length :]
    return out


def negotiating(mode: TlsMode) -> NbdServerConnection:
    conn = NbdServerConnection(EXPORTS, tls=mode)
    assert events_of(conn, FIXED) == []
    replies(conn)
    return conn


def under_tls(mode: TlsMode = TlsMode.REQUIRE) -> NbdServerConnection:
    conn = negotiating(mode)
    assert events_of(conn, option(c.Opt.STARTTLS)) == [StartTls()]
    assert replies(conn) == [(c.Opt.STARTTLS, c.Rep.ACK, b"")]
    conn.tls_established()
    return conn


@pytest.mark.parametrize(
    "opt",
    [c.Opt.LIST, c.Opt.INFO, c.Opt.GO, c.Opt.STRUCTURED_REPLY, c.Opt.SET_META_CONTEXT, 42],
)
def test_require_answers_every_option_before_tls_with_tls_reqd(opt: int) -> None:
    conn = negotiating(TlsMode.REQUIRE)
    data = go()[16:] if opt in (c.Opt.INFO, c.Opt.GO) else b""  # past the option header
    assert events_of(conn, option(opt, data)) == [TlsRequired(opt)]
    [(answered, rep, message)] = replies(conn)
    assert (answered, rep) == (opt, c.Rep.ERR_TLS_REQD)
    assert b"STARTTLS" in message
    assert conn.phase is Phase.OPTIONS and conn.export is None


def test_require_closes_on_export_name_without_tls_and_acks_abort() -> None:
    conn = negotiating(TlsMode.REQUIRE)
    with pytest.raises(RemoteProtocolError, match="EXPORT_NAME without TLS"):
        events_of(conn, option(c.Opt.EXPORT_NAME, b"vol0"))
    conn = negotiating(TlsMode.REQUIRE)
    [event] = events_of(conn, option(c.Opt.ABORT))
    assert isinstance(event, Disconnect)
    assert replies(conn) == [(c.Opt.ABORT, c.Rep.ACK, b"")]


def test_require_serves_the_export_once_tls_is_up() -> None:
    conn = under_tls(TlsMode.REQUIRE)
    [chosen] = events_of(conn, go())
    assert isinstance(chosen, ExportChosen) and conn.tls_active
    assert all(rep != c.Rep.ERR_TLS_REQD for _, rep, _ in replies(conn))


def test_optional_serves_plaintext_and_tls_clients() -> None:
    plain = negotiating(TlsMode.OPTIONAL)
    [chosen] = events_of(plain, go())
    assert isinstance(chosen, ExportChosen) and not plain.tls_active
    tls = under_tls(TlsMode.OPTIONAL)
    assert isinstance(events_of(tls, go())[0], ExportChosen)


def test_without_tls_configured_starttls_is_refused_by_policy_never_tls_reqd() -> None:
    conn = negotiating(TlsMode.OFF)
    assert events_of(conn, option(c.Opt.STARTTLS) + option(c.Opt.LIST)) == []
    answers = replies(conn)
    assert answers[0][:2] == (c.Opt.STARTTLS, c.Rep.ERR_POLICY)
    assert all(rep != c.Rep.ERR_TLS_REQD for _, rep, _ in answers)
    assert isinstance(events_of(conn, go())[0], ExportChosen)


def test_starttls_twice_or_with_data_is_invalid() -> None:
    conn = under_tls()
    assert events_of(conn, option(c.Opt.STARTTLS)) == []
    assert replies(conn)[0][:2] == (c.Opt.STARTTLS, c.Rep.ERR_INVALID)
    conn = negotiating(TlsMode.OPTIONAL)
    assert events_of(conn, option(c.Opt.STARTTLS, b"x")) == []
    assert replies(conn)[0][:2] == (c.Opt.STARTTLS, c.Rep.ERR_INVALID)
    assert conn.phase is Phase.OPTIONS


def test_options_pipelined_after_starttls_are_never_parsed_as_plaintext() -> None:
    conn = negotiating(TlsMode.REQUIRE)
    with pytest.raises(RemoteProtocolError, match="plaintext bytes after NBD_OPT_STARTTLS"):
        events_of(conn, option(c.Opt.STARTTLS) + go())  # in the same read
    assert replies(conn) == []  # not even the ACK
    conn = negotiating(TlsMode.REQUIRE)
    assert events_of(conn, option(c.Opt.STARTTLS)) == [StartTls()]
    with pytest.raises(RemoteProtocolError, match="plaintext bytes after NBD_OPT_STARTTLS"):
        events_of(conn, go()[:1])  # in a later read, before the handshake is done
    assert conn.export is None


def test_what_was_negotiated_in_plaintext_is_forgotten_at_starttls() -> None:
    conn = negotiating(TlsMode.OPTIONAL)
    events_of(conn, option(c.Opt.STRUCTURED_REPLY))
    assert conn.structured
    events_of(conn, option(c.Opt.STARTTLS))
    conn.tls_established()
    assert not conn.structured  # a man in the middle may have injected it


def test_tls_established_out_of_turn_is_our_bug() -> None:
    with pytest.raises(LocalProtocolError):
        negotiating(TlsMode.REQUIRE).tls_established()


@st.composite
def tls_sessions(draw: st.DrawFn) -> list[bytes]:
    """The reads a server sees: one option per read, or a mutated stream cut anywhere."""
    parts = [FIXED]
    pool = [
        option(c.Opt.STARTTLS),
        option(c.Opt.STARTTLS, b"zz"),
        option(c.Opt.LIST),
        option(c.Opt.STRUCTURED_REPLY),
        option(c.Opt.EXPORT_NAME, b"vol0"),
        go(),
        go("nope"),
        option(c.Opt.ABORT),
    ]
    options = st.lists(st.sampled_from(pool), max_size=4)
    parts += draw(options)
    if draw(st.booleans()):
        parts.append(option(c.Opt.STARTTLS))
    parts += draw(options)
    if draw(st.booleans()):
        return parts
    stream = mutate(draw, b"".join(parts), 24)
    chunk = draw(st.integers(1, 40))
    return [stream[i : i + chunk] for i in range(0, len(stream), chunk)]


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(reads=tls_sessions(), mode=st.sampled_from(list(TlsMode)))
def test_hostile_streams_in_every_mode_raise_only_remote_protocol_error(
    reads: list[bytes], mode: TlsMode
) -> None:
    """The TLS handshake "completes" as soon as StartTls is seen (as far as the core knows,
    the reads that follow are decrypted ones)."""
    conn = NbdServerConnection(EXPORTS, tls=mode)
    try:
        for data in reads:
            for event in events_of(conn, data):
                assert isinstance(
                    event, StartTls | TlsRequired | ExportChosen | Disconnect | RequestRefused
                )
                if isinstance(event, StartTls):
                    assert mode is not TlsMode.OFF
                    conn.tls_established()
                if isinstance(event, ExportChosen) and mode is TlsMode.REQUIRE:
                    assert conn.tls_active
                if isinstance(event, TlsRequired):
                    assert mode is TlsMode.REQUIRE and not conn.tls_active
    except RemoteProtocolError:
        pass


# -- a real handshake through TlsPipe, on memory BIOs ------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@dataclass
class TlsLink:
    """The server's TlsPipe and an ssl client, joined by two memory BIOs."""

    pipe: TlsPipe
    client: ssl.SSLObject
    to_server: ssl.MemoryBIO
    to_client: ssl.MemoryBIO

    def handshake(self) -> None:
        for _ in range(5):  # client and server take turns
            with contextlib.suppress(ssl.SSLWantReadError):
                self.client.do_handshake()
            assert self.pipe.receive(self.to_server.read()) == b""
            self.to_client.write(self.pipe.to_send())
            if self.pipe.established:
                return
        raise AssertionError("no TLS handshake in 5 turns")

    def client_reads(self, records: bytes) -> bytes:
        self.to_client.write(records)
        chunks = []
        while True:
            try:
                chunks.append(self.client.read(1 << 20))
            except ssl.SSLWantReadError:
                return b"".join(chunks)


@pytest.fixture
def link(tmp_path: Path) -> TlsLink:
    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
             "-subj", "/CN=server")  # fmt: skip
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=cert)
    client_ctx.check_hostname = False
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(to_client, to_server)
    return TlsLink(TlsPipe(server_ctx), client, to_server, to_client)


def test_a_real_tls_client_negotiates_through_the_pipe_and_the_core(link: TlsLink) -> None:
    conn = negotiating(TlsMode.REQUIRE)
    assert events_of(conn, option(c.Opt.STARTTLS)) == [StartTls()]
    replies(conn)
    link.handshake()
    conn.tls_established()
    link.client.write(go())
    [chosen] = events_of(conn, link.pipe.receive(link.to_server.read()))
    assert isinstance(chosen, ExportChosen) and conn.tls_active
    for item in conn.data_to_send():
        assert isinstance(item, bytes | memoryview)
        link.pipe.write(item)
    answer = link.client_reads(link.pipe.to_send())
    magic, opt, rep = struct.unpack_from(">QII", answer)
    assert (magic, opt, rep) == (c.OPTION_REPLY_MAGIC, c.Opt.GO, c.Rep.INFO)


# -- the reply stream over TLS (common.nbd.sender) ---------------------------------------------

VOLUME_BYTES = 16 << 20
PATTERN = bytes(range(251)) * (VOLUME_BYTES // 251 + 1)  # 251: slices never line up with it


class FakeVolume:
    def read(self, offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= VOLUME_BYTES
        return PATTERN[offset : offset + length]


class FakeTransport:
    """Buffers what is written; 'busy' from the first byte until drained (the (1, 0) limits
    ReplySender sets), like an asyncio transport with a client that does not read."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.sender: ReplySender | None = None

    def get_extra_info(self, name: str) -> None:
        return None

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        assert (high, low) == (1, 0)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return sum(map(len, self.written))

    def write(self, data: bytes | memoryview) -> None:
        if not self.written and self.sender is not None:
            self.sender.transport_paused()
        self.written.append(bytes(data))

    def writelines(self, items: list[bytes | memoryview]) -> None:
        for item in items:
            self.write(item)

    def drain(self) -> bytes:
        """The client took everything: resume_writing."""
        data, self.written = b"".join(self.written), []
        assert self.sender is not None
        self.sender.transport_resumed()
        return data


def test_tls_replies_hold_one_chunk_in_memory_however_much_is_queued(link: TlsLink) -> None:
    link.handshake()
    transport = FakeTransport()
    backlog: list[bool] = []
    sender = ReplySender(transport, backlog.append)  # type: ignore[arg-type]
    transport.sender = sender
    sender.volume = FakeVolume()  # type: ignore[assignment]
    sender.start_tls(link.pipe)
    header = b"H" * 16
    items: list[Outgoing] = [header, FileData(0, VOLUME_BYTES)] * 8  # 128 MiB of read replies
    peak = peak_traced(lambda: sender.send(items))
    assert peak < 3 * TLS_CHUNK_BYTES, peak  # not 128 MiB read and encrypted at once
    assert backlog == [True]  # over QUEUE_HIGH_BYTES: the adapter stops reading requests

    received, expected = hashlib.sha256(), hashlib.sha256()
    for _ in range(8):
        expected.update(header + PATTERN[:VOLUME_BYTES])
    while transport.written:
        received.update(link.client_reads(transport.drain()))
    assert received.digest() == expected.digest()  # every byte, in order
    assert sender.idle and backlog == [True, False]
