"""The old primary's last word in a swap: it tells the other site that the swap took place.

A swap ends with the old primary persisting the secondary role and answering the last step
(COMMIT of a takeover, or RESYNC); only that answer makes the other site the primary. When
the answer is lost (the link drops at that moment), both sites are secondaries, neither
listens, and hosts can write neither. So a site that a swap made the secondary keeps
listening on its listen.replication address, with the link's TLS and secret, until it has
joined the new primary's generation:

    other site ── Hello(generation G) ──► SwappedOutAnswerer.welcome()
               ◄── Swapped(G, last_seq, kind)   G is the generation this site left: the
                                                other site finishes the swap
                                                (secondaryd.group.peer_swapped)
               ◄── Refuse(not_primary)          any other generation or group

The record's swapped_out_* fields (primaryd.group._become_secondary) say which swap; they
are cleared when this site joins a generation, becomes the primary, or its hosts write it.
"""

from __future__ import annotations

import logging

from common.pairrecord import PairRecord
from common.replication.messages import (
    BitmapTaken,
    Hello,
    JournalBatch,
    ReadJournal,
    Refuse,
    RefuseCode,
    ReportBitmap,
    SwapAnswer,
    SwapKind,
    Swapped,
    SwapRequest,
    Welcome,
)

log = logging.getLogger("journalpair.secondary")

_NOT_PRIMARY = "this site is a secondary"


class SwappedOutAnswerer:
    """common.replication.server.JournalSource for a site a swap made the secondary: every
    connection ends after its Hello is answered."""

    def __init__(self, group: str, record: PairRecord) -> None:
        self.group = group
        self.record = record

    def welcome(self, hello: Hello, peer: str) -> Welcome | Refuse | Swapped:
        record = self.record
        if hello.group != self.group:
            return Refuse(RefuseCode.GROUP, f"this site is of group {self.group!r}")
        if not record.swapped_out_of:
            return Refuse(RefuseCode.NOT_PRIMARY, _NOT_PRIMARY)
        if hello.generation != record.swapped_out_of:
            return Refuse(
                RefuseCode.NOT_PRIMARY,
                f"{_NOT_PRIMARY}: a swap out of generation {record.swapped_out_of} made it "
                f"so, and you are of generation {hello.generation or 'none'}",
            )
        kind = SwapKind(record.swapped_out_kind)
        log.warning(
            "told %s that this site became the secondary (%s at seq %d of generation %s): "
            "it finishes the swap",
            peer,
            "takeover (swap)" if kind is SwapKind.COMMIT else "resync --swap",
            record.swapped_out_seq,
            record.swapped_out_of,
        )
        return Swapped(self.group, record.swapped_out_of, record.swapped_out_seq, kind)

    async def read_journal(self, request: ReadJournal) -> JournalBatch | Refuse:
        return Refuse(RefuseCode.NOT_PRIMARY, _NOT_PRIMARY)  # never reached: no Welcome

    def report_bitmap(self, report: ReportBitmap) -> BitmapTaken | Refuse:
        return Refuse(RefuseCode.NOT_PRIMARY, _NOT_PRIMARY)

    async def swap(self, request: SwapRequest) -> SwapAnswer | Refuse:
        return Refuse(RefuseCode.NOT_PRIMARY, _NOT_PRIMARY)

    def link_closed(self, peer: str) -> None:
        pass

    def heard(self) -> None:
        pass
