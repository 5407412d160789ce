"""A site's identity: a random id made at its first start, kept in data_dir/site_id.

A secondary remembers the id of the primary it is paired with (PairRecord.peer_site_id) and
follows no other: a blank or foreign primaryd brought up at the primary's address with the
same group name (a rebuilt host, a copied config) would otherwise make it leave the pair,
and a takeover would then be impossible. The id survives a lost pair.json; a wiped data_dir
is a new site.
"""

from __future__ import annotations

import logging
import re
import secrets
from pathlib import Path

from common.statefile import StateFileError, read_bytes, write_bytes_atomic

__all__ = ["site_id"]

log = logging.getLogger("journalpair")

FILE_NAME = "site_id"
_ID = re.compile(r"[0-9a-f]{16}")


def site_id(data_dir: Path) -> str:
    """This site's id, made (and persisted) on first use."""
    path = data_dir / FILE_NAME
    try:
        data = read_bytes(path, max_bytes=64)
    except StateFileError as exc:
        data = None
        log.error("%s: making a new site id (the secondary must then be paired again)", exc)
    if data is not None:
        text = data.decode(errors="replace").strip()
        if _ID.fullmatch(text):
            return text
        log.error("%s: not a site id (%r); making a new one", path, text[:40])
    new_id = secrets.token_hex(8)
    write_bytes_atomic(path, f"{new_id}\n".encode())
    log.info("this site's id: %s", new_id)
    return new_id
