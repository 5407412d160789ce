"""An iSCSI host for the e2e tests: daemons with iscsi.listen, and a raw initiator.

    with_iscsi(daemon)        appends iscsi.listen on a free port to its config
    lun_url(daemon, n)        iscsi://127.0.0.1:PORT/IQN/n for libiscsi and qemu-io
    RawSession                one TCP connection: login (no digests, ImmediateData=Yes),
                              WRITE 10 with its data immediate, one command at a time
    IscsiBlockWriter          writes.py's numbered blocks over a RawSession (QD1), each
                              write's submit and ack times recorded, so check_prefix judges
                              a copy of what it wrote

The initiator is ours (the core's PDU codec over a blocking socket) because the libiscsi
tools here give no per-write acknowledgement times.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence

from common.iscsi import scsi
from common.iscsi.pdu import BHS_BYTES, RESERVED_TAG, Op, Pdu, decode_bhs, encode_pdu, pad4
from tests.e2e.helpers import HOST, Daemon, free_port
from tests.e2e.writes import VOLUMES, WRITER_HANG_S, Write, block, slot_location
from tests.unit.test_iscsi_core import INITIATOR, login_pdu, scsi_cmd

IQN = "iqn.2026-01.org.journalpair:jg0"  # derived from the group (tests use jg0)
LUN_OF_VOLUME = {name: lun for lun, (name, _) in enumerate(VOLUMES)}


def with_iscsi(daemon: Daemon) -> Daemon:
    """The daemon's config gets iscsi.listen on a free port (before it starts)."""
    port = free_port()
    with daemon.config_path.open("a") as config:
        config.write(f"iscsi: {{listen: '{HOST}:{port}'}}\n")
    daemon.iscsi_port = port  # type: ignore[attr-defined]
    return daemon


def lun_url(daemon: Daemon, lun: int) -> str:
    return f"iscsi://{HOST}:{daemon.iscsi_port}/{IQN}/{lun}"  # type: ignore[attr-defined]


def write_10_cdb(offset: int, length: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, offset // 512, 0, length // 512, 0)


class RawSession:
    """A logged-in normal session on one connection; commands one at a time."""

    def __init__(self, port: int, timeout_s: float = 10.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout_s)
        self._itt, self._cmd_sn = 1, 100  # the login's CmdSN is 100 (immediate)
        names = [("InitiatorName", INITIATOR), ("TargetName", IQN), ("SessionType", "Normal")]
        self.sock.sendall(encode_pdu(login_pdu([*names, ("AuthMethod", "None")], 0, 1)))
        assert self.receive().opcode == Op.LOGIN_RSP
        keys = [("MaxRecvDataSegmentLength", "8192"), ("ImmediateData", "Yes")]
        self.sock.sendall(encode_pdu(login_pdu(keys, 1, 3)))
        answer = self.receive()
        assert answer.opcode == Op.LOGIN_RSP and answer.flags & 0x80, "login not accepted"

    def close(self) -> None:
        self.sock.close()

    def receive(self) -> Pdu:
        """The next PDU from the target (no digests: this initiator offers none)."""
        pdu, ahs_bytes, data_bytes = decode_bhs(self._exactly(BHS_BYTES))
        self._exactly(ahs_bytes)
        pdu.data = self._exactly(data_bytes + pad4(data_bytes))[:data_bytes]
        return pdu

    def write(self, lun: int, offset: int, data: bytes) -> Pdu:
        """WRITE 10 with ``data`` immediate (at most FirstBurstLength): its SCSI Response.
        A NOP-In ping that comes first is answered."""
        itt = self._itt
        cdb = write_10_cdb(offset, len(data))
        command = scsi_cmd(cdb, itt, self._cmd_sn, len(data), write=True, lun=lun, data=data)
        self.sock.sendall(encode_pdu(command))
        self._itt, self._cmd_sn = self._itt + 1, self._cmd_sn + 1
        while True:
            pdu = self.receive()
            if pdu.opcode == Op.NOP_IN and pdu.field32(20) != RESERVED_TAG:
                self._answer_ping(pdu)
                continue
            assert pdu.opcode == Op.SCSI_RSP and pdu.itt == itt, pdu
            return pdu

    def _answer_ping(self, ping: Pdu) -> None:
        fields = struct.pack(">III", ping.field32(20), self._cmd_sn, 0) + bytes(16)
        answer = Pdu(
            Op.NOP_OUT, flags=0x80, immediate=True, itt=RESERVED_TAG, opcode_specific=fields
        )
        answer.lun_or_isid = ping.lun_or_isid
        self.sock.sendall(encode_pdu(answer))

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("the target closed the connection")
            data += chunk
        return data


class IscsiBlockWriter(threading.Thread):
    """Numbered blocks to random ``slots`` (both LUNs), one write at a time, until stopped or
    its connection dies (the primary was killed); ``log`` as writes.BlockWriter keeps it."""

    def __init__(
        self, daemon: Daemon, slots: Sequence[int], numbers: Iterator[int], seed: int
    ) -> None:
        super().__init__(daemon=True, name="iscsi-writer")
        self.port: int = daemon.iscsi_port  # type: ignore[attr-defined]
        self.slots, self.numbers = list(slots), numbers
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.log: list[Write] = []
        self._lock = threading.Lock()
        self.ended_by: BaseException | None = None

    def acked(self) -> int:
        with self._lock:
            return sum(w.ack_ns is not None for w in self.log)

    def snapshot(self) -> list[Write]:
        with self._lock:
            return [Write(w.n, w.slot, w.submit_ns, w.ack_ns) for w in self.log]

    def run(self) -> None:
        try:
            session = RawSession(self.port, timeout_s=WRITER_HANG_S)
            try:
                while not self.stop.is_set():
                    self._write_one(session)
            finally:
                session.close()
        except BaseException as exc:  # a killed primary ends it here; the test decides
            self.ended_by = exc

    def _write_one(self, session: RawSession) -> None:
        slot = self.rng.choice(self.slots)
        n = next(self.numbers)
        volume, offset = slot_location(slot)
        write = Write(n, slot, time.monotonic_ns())
        with self._lock:
            self.log.append(write)
        answer = session.write(LUN_OF_VOLUME[volume], offset, block(n, slot))
        assert answer.spec3 == scsi.Status.GOOD, f"write {n}: status {answer.spec3:#x}"
        with self._lock:
            write.ack_ns = time.monotonic_ns()

    def finish_after_kill(self, timeout_s: float = 30.0) -> None:
        """The primary was killed: the connection fails, which ends the writer."""
        self.stop.set()
        self.join(timeout_s)
        assert not self.is_alive(), "the iSCSI writer hung after the primary died"
