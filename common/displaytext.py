"""The daemon's display result as text for operators, like pairdisplay or `drbdadm status`.

    jg0  primary  COPY                                  ◄── group, role, state
      reason     create by operator
      copy       50.0% applied (512.0 MiB of 1.0 GiB), 75.0% sent, 80.0 MiB/s, ETA 6 s
      lag        10 entries, 1.5 KiB, 0.2 s
      journal    25.0% (256.0 MiB of 1.0 GiB)
      bitmap     0 B dirty
      link       up for 2m05s (since ...), peer 127.0.0.1:7411
      secondary  COPY, restored 1190, applied 1180, heard 0.1 s ago   ◄── the peer's view
      seq        first 1, last 1200, restored 1190, applied 1180
      generation 3

    VOLUME      SIZE  PATH
    vol0     1.0 GiB  /srv/jp/vol0.img

Pure functions of the result: no clock, no I/O. Fields a daemon did not send are left out,
anything of the wrong type shows as "?" or "-", never a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

__all__ = ["copy_text", "duration", "human_size", "percent", "render_display", "text"]

_SIZE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")
_ACTIVE = ("COPY", "PAIR", "PFUL")  # states where the secondary follows what it is sent


def human_size(value: object) -> str:
    """Bytes as "512 B", "1.0 KiB", "1.0 GiB"; "?" for anything that is not a number."""
    if not _is_number(value):
        return "?"
    if abs(value) < 1024:
        return f"{int(value)} B"
    scaled = float(value)
    for unit in _SIZE_UNITS:
        scaled /= 1024
        if abs(scaled) < 1024 or unit == _SIZE_UNITS[-1]:
            break
    return f"{scaled:.1f} {unit}"


def duration(seconds: object) -> str:
    """ "4.2 s" under a minute, then "2m05s", "3h02m", "2d03h"; "?" for a non-number."""
    if not _is_number(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def percent(part: object, whole: object) -> str:
    if not _is_number(part) or not _is_number(whole) or whole <= 0:
        return "-"
    return f"{100 * min(part, whole) / whole:.1f}%"


def text(value: object) -> str:
    if value is None or value == "":
        return "-"
    return " ".join(str(value).split())  # one line, whatever the daemon sent


def copy_text(copy: Mapping[str, Any], sent: bool = False) -> str:
    """'40.0% applied (12.8 MiB of 32.0 MiB), 100.0% sent, 4.0 MiB/s, ETA 4.8 s' from a
    display's `copy` (the primary's); '50.0% (16.0 MiB of 32.0 MiB)' without applied_bytes,
    '50.0% sent (...)' with `sent` (the secondary's, which has what the primary sent)."""
    done, total = copy.get("done_bytes"), copy.get("total_bytes")
    if _is_number(done) and _is_number(total):
        done = min(done, total)  # data sent again after a reconnect is counted again
    applied = copy.get("applied_bytes")
    if _is_number(applied):
        line = f"{percent(applied, total)} applied ({human_size(applied)} of {human_size(total)})"
        line += f", {percent(done, total)} sent"
    else:
        how = " sent" if sent else ""
        line = f"{percent(done, total)}{how} ({human_size(done)} of {human_size(total)})"
    rate = copy.get("rate_bytes_per_s")
    if _is_number(rate):
        eta = copy.get("eta_s")
        line += f", {human_size(rate)}/s, ETA {duration(eta) if _is_number(eta) else '-'}"
    elif "rate_bytes_per_s" in copy:
        line += ", rate not measured yet"
    return line


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _section(result: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = result.get(key)
    return value if isinstance(value, Mapping) else None


def _used(part: object, whole: object) -> str:
    return f"{percent(part, whole)} ({human_size(part)} of {human_size(whole)})"


def _link(link: Mapping[str, Any]) -> str:
    line = "up" if link.get("up") else "down"
    if _is_number(link.get("for_s")):
        line += f" for {duration(link['for_s'])}"
    if link.get("since"):
        since = text(link["since"])
        line += f" (since {since})" if "for_s" in link else f" since {since}"
    if link.get("peer"):
        line += f", peer {text(link['peer'])}"
    if link.get("why") and not link.get("up"):
        line += f": {text(link['why'])}"
    return line


def _lag(lag: Mapping[str, Any]) -> str:
    seconds = lag.get("seconds")
    when = f"{seconds:.1f} s" if _is_number(seconds) else "? s"
    return f"{text(lag.get('entries'))} entries, {human_size(lag.get('bytes'))}, {when}"


def _heard(peer: Mapping[str, Any]) -> list[str]:
    silent = peer.get("silent_s")
    return [f"heard {duration(silent)} ago"] if _is_number(silent) else []


def _secondary_row(result: Mapping[str, Any], peer: Mapping[str, Any]) -> str:
    """The primary's view of its secondary: the state it follows, how far it got."""
    sent = peer.get("sent_state")
    if sent:
        parts = [text(sent)]
    elif peer.get("state"):
        parts = [f"{text(peer['state'])} at its last Hello"]
    else:
        parts = ["never connected"]
    for key in ("restored_seq", "applied_seq"):
        if key in peer:
            parts.append(f"{key.removesuffix('_seq')} {text(peer[key])}")
    parts += _heard(peer)
    if peer.get("written_while_split"):
        parts.append("hosts wrote it while split")
    return ", ".join(parts)


def _primary_row(result: Mapping[str, Any], peer: Mapping[str, Any]) -> str:
    """The secondary's view of its primary, from the primary's last answer."""
    parts = [f"last seq {text(peer.get('last_seq'))}", *_heard(peer)]
    sent = peer.get("sent_state")
    if sent and sent != result.get("state") and result.get("state") in _ACTIVE:
        parts.append(f"it says this site is {text(sent)}")
    return ", ".join(parts)


def _peer_row(result: Mapping[str, Any]) -> tuple[str, str] | None:
    peer = _section(result, "peer")
    if peer is None:
        return None
    if result.get("role") == "secondary":
        return "primary", _primary_row(result, peer)
    return "secondary", _secondary_row(result, peer)


def _rows(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = [("reason", text(result.get("reason")))]
    if result.get("split_brain"):
        rows.append(("SPLIT BRAIN", "hosts wrote both sites while split: resync needs a decision"))
    if result.get("destage_error"):
        rows.append(("DESTAGE", f"stopped: {text(result['destage_error'])}"))
    if (copy := _section(result, "copy")) is not None:
        rows.append(("copy", copy_text(copy, sent=result.get("role") == "secondary")))
    if (lag := _section(result, "lag")) is not None:
        rows.append(("lag", _lag(lag)))
    if (journal := _section(result, "journal")) is not None:
        rows.append(("journal", _used(journal.get("used_bytes"), journal.get("capacity_bytes"))))
    if (bitmap := _section(result, "bitmap")) is not None:
        rows.append(("bitmap", f"{human_size(bitmap.get('dirty_bytes'))} dirty"))
    if (link := _section(result, "link")) is not None:
        rows.append(("link", _link(link)))
    if (peer_row := _peer_row(result)) is not None:
        rows.append(peer_row)
    if (seq := _section(result, "seq")) is not None:
        names = ("first", "last", "primary_last", "restored", "applied")
        rows.append(("seq", ", ".join(f"{n} {text(seq.get(n))}" for n in names if n in seq)))
    if "generation" in result:
        rows.append(("generation", text(result["generation"])))
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Columns padded to their widest cell; `right` holds the right-aligned column indexes."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def render_display(result: Mapping[str, Any]) -> str:
    """The display result as text: a title line, indented key/value rows, the volumes."""
    title = "  ".join(text(result.get(key)) for key in ("group", "role", "state"))
    rows = _rows(result)
    width = max(len(key) for key, _ in rows)
    lines = [title, *(f"  {key.ljust(width)}  {value}" for key, value in rows)]
    volumes = result.get("volumes")
    if isinstance(volumes, list) and volumes:
        table = [
            (text(v.get("name")), human_size(v.get("size")), text(v.get("path")))
            for v in volumes
            if isinstance(v, Mapping)
        ]
        lines += ["", *_table(("VOLUME", "SIZE", "PATH"), table, right={1})]
    return "\n".join(lines) + "\n"
