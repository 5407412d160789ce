"""NBD over TLS (NBD_OPT_STARTTLS, x509) with real daemons and real clients on 127.0.0.1.

libnbd (nbdinfo, nbdcopy: an nbds:// URI with ?tls-certificates=DIR holding ca-cert.pem,
client-cert.pem, client-key.pem) and QEMU (qemu-io, qemu-img: --object tls-creds-x509 on the
same directory) write and read back over TLS, and the writes replicate. With nbd.tls.mode
require a plaintext client gets NBD_REP_ERR_TLS_REQD (or is closed on EXPORT_NAME), bytes
pipelined after STARTTLS and plaintext instead of a handshake close that client only; with
nbd.tls.ca a certificate from another CA, or none, is refused. Reads held back by the reply
backlog over TLS are all answered in order once the client reads. Each refusal is logged with
the client's address and the likely cause. With mode optional both kinds of client work;
a client that sends STARTTLS and then nothing is dropped after nbd.handshake_timeout_s.
"""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from common.nbd.sender import QUEUE_HIGH_BYTES
from tests.e2e.helpers import (
    HOST,
    Daemon,
    Daemons,
    MiB,
    create_pair,
    qemu_io,
    run,
    run_daemon_to_exit,
    volumes_equal,
    wait_caught_up,
    wait_until,
)
from tests.e2e.nbdsetup import recv_exact

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
OPT_EXPORT_NAME, OPT_STARTTLS, OPT_GO = 1, 5, 7
REP_ACK = 1
REP_ERR_TLS_REQD = (1 << 31) + 5
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, CMD_READ = 0x25609513, 0x67446698, 0
LOG_WAIT_S = 10.0


# -- certificates (openssl CLI) ----------------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _new_key_and_csr(key: Path, csr: Path, name: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")  # fmt: skip


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A CA GnuTLS and QEMU accept: basicConstraints CA:TRUE, keyCertSign."""
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    return key, cert


def _signed(directory: Path, name: str, ca: tuple[Path, Path], usage: str) -> tuple[Path, Path]:
    """A certificate for `name` signed by `ca`; a server's names 127.0.0.1 (clients check)."""
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    _new_key_and_csr(key, csr, name)
    ext = directory / f"{name}.ext"
    lines = [f"extendedKeyUsage={usage}", "basicConstraints=CA:FALSE",
             "keyUsage=critical,digitalSignature,keyEncipherment"]  # fmt: skip
    if usage == "serverAuth":
        lines.append(f"subjectAltName=IP:{HOST},DNS:localhost")
    ext.write_text("\n".join(lines) + "\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return key, cert


def _client_dir(directory: Path, trusted_ca: Path, client: tuple[Path, Path] | None) -> Path:
    """The directory libnbd (tls-certificates) and QEMU (tls-creds-x509 dir) read."""
    directory.mkdir()
    (directory / "ca-cert.pem").write_bytes(trusted_ca.read_bytes())
    if client is not None:
        (directory / "client-key.pem").write_bytes(client[0].read_bytes())
        (directory / "client-key.pem").chmod(0o600)
        (directory / "client-cert.pem").write_bytes(client[1].read_bytes())
    return directory


class Pki:
    """Our CA, the server's certificate, and client directories: one our CA signed, one a
    rogue CA signed (it trusts our CA, so only its own certificate is wrong), one with none."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        ca, rogue_ca = _ca(directory, "ca"), _ca(directory, "rogue-ca")
        self.ca = ca[1]
        self.server = _signed(directory, "server", ca, "serverAuth")
        self.client = _client_dir(
            directory / "client", ca[1], _signed(directory, "client", ca, "clientAuth")
        )
        self.rogue = _client_dir(
            directory / "rogue", ca[1], _signed(directory, "rogue", rogue_ca, "clientAuth")
        )
        self.anonymous = _client_dir(directory / "anonymous", ca[1], None)

    def nbd(self, mode: str, *, with_ca: bool = True) -> dict[str, Any]:
        tls = {"cert": str(self.server[1]), "key": str(self.server[0]), "mode": mode}
        return {"tls": tls | ({"ca": str(self.ca)} if with_ca else {})}


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


# -- clients -----------------------------------------------------------------------------------


def nbds_uri(daemon: Daemon, certificates: Path) -> str:
    return f"nbds://{HOST}:{daemon.nbd_port}/vol0?tls-certificates={certificates}"


def qemu_tls(daemon: Daemon, certificates: Path) -> list[str]:
    """qemu-io/qemu-img arguments for vol0 over TLS (then --image-opts or
    --target-image-opts and this string)."""
    return [
        "--object",
        f"tls-creds-x509,id=tls0,dir={certificates},endpoint=client",
        f"driver=raw,file.driver=nbd,file.host={HOST},file.port={daemon.nbd_port},"
        "file.export=vol0,file.tls-creds=tls0",
    ]


def nbdinfo(uri: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["nbdinfo", uri], check=check, timeout=30)


def logged(daemon: Daemon, words: str) -> None:
    wait_until(lambda: words in daemon.log_text(), LOG_WAIT_S, f"the log to say {words!r}")


class RawClient:
    """A hand-written client up to the end of the option haggling (proto.md)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=LOG_WAIT_S)
        self.port = int(self.sock.getsockname()[1])
        self.recv_exact(18)  # NBDMAGIC, IHAVEOPT, handshake flags
        self.sock.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes

    def recv_exact(self, length: int) -> bytes:
        return recv_exact(self.sock, length)

    @staticmethod
    def option(opt: int, data: bytes = b"") -> bytes:
        return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data

    @staticmethod
    def go(name: str = "vol0") -> bytes:
        raw = name.encode()
        return RawClient.option(OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))

    def reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC, hex(magic)
        return opt, rep, self.recv_exact(length)

    def start_tls(self, pki: Pki) -> None:
        """STARTTLS, then the rest of the session over TLS with the client certificate."""
        self.sock.sendall(self.option(OPT_STARTTLS))
        assert self.reply() == (OPT_STARTTLS, REP_ACK, b"")
        context = ssl.create_default_context(cafile=pki.ca)  # checks the server's IP SAN
        context.load_cert_chain(pki.client / "client-cert.pem", pki.client / "client-key.pem")
        self.sock = context.wrap_socket(self.sock, server_hostname=HOST)

    def go_to_transmission(self) -> None:
        self.sock.sendall(self.go())
        while (reply := self.reply())[1] != REP_ACK:
            assert reply[1] == 3, reply  # NBD_REP_INFO

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1 << 16) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


# -- the tests ---------------------------------------------------------------------------------


def test_tls_clients_write_read_back_and_the_writes_replicate(
    daemons: Daemons, pki: Pki, tmp_path: Path
) -> None:
    primary = daemons.prepare("primary", nbd=pki.nbd("require"))
    primary.start()
    secondary = daemons.prepare("secondary", primary_port=primary.peer_port)
    secondary.start()
    create_pair(primary, secondary)

    info = nbdinfo(nbds_uri(primary, pki.client))
    assert "with TLS" in info.stdout, info.stdout
    run(["qemu-io", *qemu_tls(primary, pki.client)[:2], "--image-opts",
         qemu_tls(primary, pki.client)[2], "-c", "write -P 0x6b 1M 3M",
         "-c", "read -P 0x6b 1M 3M"])  # fmt: skip
    source = tmp_path / "source.img"
    source.write_bytes(bytes(range(256)) * (8 * MiB // 256))
    run(["qemu-img", "convert", "-n", "-f", "raw", *qemu_tls(primary, pki.client)[:2],
         str(source), "--target-image-opts", qemu_tls(primary, pki.client)[2]])  # fmt: skip
    copy = tmp_path / "copy.img"
    run(["nbdcopy", nbds_uri(primary, pki.client), str(copy)])
    assert copy.read_bytes()[: 8 * MiB] == source.read_bytes()
    assert copy.read_bytes()[8 * MiB :] == bytes(64 * MiB - 8 * MiB)

    wait_caught_up(primary)
    assert volumes_equal(primary, secondary)
    assert "TLSv1.3, certificate of client" in primary.log_text()
    assert "TLS require (clients need a certificate from nbd.tls.ca)" in primary.log_text()


def test_a_plaintext_client_is_refused_when_tls_is_required(daemons: Daemons, pki: Pki) -> None:
    primary = daemons.prepare("primary", nbd=pki.nbd("require"))
    primary.start()

    refused = nbdinfo(f"nbd://{HOST}:{primary.nbd_port}/vol0", check=False)
    assert refused.returncode != 0, refused.stdout
    logged(primary, "without TLS: TLS is required (nbd.tls.mode: require)")

    client = RawClient(primary.nbd_port)
    client.sock.sendall(client.go())
    opt, rep, message = client.reply()
    assert (opt, rep) == (OPT_GO, REP_ERR_TLS_REQD), (opt, hex(rep), message)
    client.sock.sendall(client.option(OPT_EXPORT_NAME, b"vol0"))  # cannot be refused: closed
    assert client.closed_by_server()
    client.close()
    logged(primary, "NBD_OPT_EXPORT_NAME without TLS")

    # Options pipelined behind STARTTLS are never read as plaintext: the client is dropped.
    client = RawClient(primary.nbd_port)
    client.sock.sendall(client.option(OPT_STARTTLS) + client.go())
    assert client.closed_by_server()
    client.close()
    logged(primary, "plaintext bytes after NBD_OPT_STARTTLS")

    # STARTTLS acknowledged, then no TLS: the handshake fails, logged with the cause.
    client = RawClient(primary.nbd_port)
    client.sock.sendall(client.option(OPT_STARTTLS))
    assert client.reply() == (OPT_STARTTLS, REP_ACK, b"")
    client.sock.sendall(client.go())
    assert client.closed_by_server()
    client.close()
    logged(primary, f"client {HOST}:{client.port} TLS handshake failed: the client did not")

    assert "with TLS" in nbdinfo(nbds_uri(primary, pki.client)).stdout  # others carry on


def test_a_client_certificate_from_another_ca_or_none_is_refused(
    daemons: Daemons, pki: Pki
) -> None:
    primary = daemons.prepare("primary", nbd=pki.nbd("require"))
    primary.start()

    rogue = nbdinfo(nbds_uri(primary, pki.rogue), check=False)
    assert rogue.returncode != 0, rogue.stdout
    logged(primary, "TLS handshake failed: the client's certificate is not signed by nbd.tls.ca")
    anonymous = nbdinfo(nbds_uri(primary, pki.anonymous), check=False)
    assert anonymous.returncode != 0, anonymous.stdout
    logged(primary, "TLS handshake failed: the client presented no certificate")
    assert "with TLS" in nbdinfo(nbds_uri(primary, pki.client)).stdout


def test_reads_held_back_by_the_backlog_over_tls_are_all_answered_in_order(
    daemons: Daemons, pki: Pki
) -> None:
    """Twice the reply backlog limit of READs sent before reading any reply: the server
    holds the rest of the requests (and of the decrypted plaintext) until the client reads,
    then answers every one, in order, with the right bytes."""
    primary = daemons.prepare("primary", nbd=pki.nbd("require"))
    primary.start()
    run(["qemu-io", *qemu_tls(primary, pki.client)[:2], "--image-opts",
         qemu_tls(primary, pki.client)[2], "-c", "write -P 0x5a 0 64M"])  # fmt: skip
    client = RawClient(primary.nbd_port)
    client.start_tls(pki)
    client.go_to_transmission()
    length = 16 << 10  # 8192 requests (229 KB): more than one receive buffer of them
    reads = 2 * QUEUE_HIGH_BYTES // length
    offsets = [cookie * length % (60 * MiB) for cookie in range(reads)]
    header = struct.Struct(">IHHQQI")
    client.sock.sendall(
        b"".join(
            header.pack(REQUEST_MAGIC, 0, CMD_READ, i, at, length) for i, at in enumerate(offsets)
        )
    )
    for cookie in range(reads):
        magic, error, handle = struct.unpack(">IIQ", client.recv_exact(16))
        assert (magic, error, handle) == (SIMPLE_REPLY_MAGIC, 0, cookie)
        assert client.recv_exact(length) == b"\x5a" * length, cookie
    client.close()


def test_optional_tls_serves_plaintext_and_tls_clients(daemons: Daemons, pki: Pki) -> None:
    nbd = pki.nbd("optional", with_ca=False) | {"handshake_timeout_s": 1}
    primary = daemons.prepare("primary", nbd=nbd)
    primary.start()

    qemu_io(primary.uri(), "write -P 0x3c 0 2M")  # plaintext
    run(["qemu-io", *qemu_tls(primary, pki.anonymous)[:2], "--image-opts",
         qemu_tls(primary, pki.anonymous)[2], "-c", "read -P 0x3c 0 2M",
         "-c", "write -P 0xd2 2M 1M"])  # fmt: skip
    qemu_io(primary.uri(), "read -P 0xd2 2M 1M")
    assert "without TLS" in nbdinfo(primary.uri()).stdout
    assert "with TLS" in nbdinfo(nbds_uri(primary, pki.anonymous)).stdout
    assert "TLSv1.3, no client certificate" in primary.log_text()  # no CA: none asked for

    # STARTTLS, then silence: the TLS handshake counts as the NBD handshake (timeout 1 s).
    client = RawClient(primary.nbd_port)
    client.sock.sendall(client.option(OPT_STARTTLS))
    assert client.reply() == (OPT_STARTTLS, REP_ACK, b"")
    assert client.closed_by_server()
    client.close()
    logged(primary, f"client {HOST}:{client.port} no handshake within 1 s")


def test_a_tls_key_readable_by_others_stops_the_daemon_with_one_line(
    daemons: Daemons, pki: Pki
) -> None:
    pki.server[0].chmod(0o644)
    primary = daemons.prepare("primary", nbd=pki.nbd("require"))
    done = run_daemon_to_exit("primary", primary.config_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "nbd.tls.key" in lines[0] and "chmod 600" in lines[0], lines[0]
