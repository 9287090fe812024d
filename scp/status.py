"""``dicom-nncodec status``: what the node holds, in a few human-readable lines.

Why read the index directly: the status must work while the node runs (and
when it does not), without a network round trip; it opens the index read-only
in spirit (no writes, no tables created) and never touches the stored files.
"""
from __future__ import annotations

import os

from sqlalchemy.engine import make_url

from . import config as C
from .index import Index


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def report(config_path: str | None) -> str:
    """The status text for the node configured by ``config_path`` (None: the default configuration).
    Raises :class:`scp.config.ConfigError` for a bad configuration."""
    return report_for(C.load(config_path))


def report_for(cfg: C.Config) -> str:
    """The status text for a loaded configuration (:class:`scp.index.IndexUnavailable` when the index
    database cannot be reached)."""
    url = C.resolved_index_url(cfg)
    shown_url = make_url(url).render_as_string(hide_password=True)
    ports = ", ".join(f"{name} {port}" for name, port in (("port", cfg.port), ("TLS port", cfg.tls.port))
                      if port is not None)
    lines = [f"node {cfg.ae_title} ({ports}, configuration {cfg.source})",
             f"storage  {os.path.abspath(cfg.storage_path)}",
             f"index    {shown_url}"]
    db = make_url(url).database if url.startswith("sqlite") else None
    if db is not None and not os.path.exists(db):
        lines.append("nothing stored yet (no index)")
        return "\n".join(lines) + "\n"
    index = Index(url)
    try:
        index.check()
        st = index.stats()
    finally:
        index.dispose()
    rx, disk = st["received_bytes"], st["stored_bytes"]
    ratio = f"{rx / disk:.2f}:1" if disk else "-"
    states = st["by_state"]
    queue = st["queue"]
    lines += [
        f"stored   {st['patients']} patients, {st['studies']} studies, {st['series']} series, "
        f"{st['instances']} instances",
        f"bytes    {_size(rx)} received, {_size(disk)} on disk (ratio {ratio})",
        "state    " + ", ".join(f"{k} {states.get(k, 0)}" for k in
                                ("compressed", "pending", "kept", "failed", "not_image")),
        f"queue    {sum(queue.values())} ({queue.get('queued', 0)} waiting, {queue.get('running', 0)} in progress)",
        "delayed  " + (f"{st['delayed']} held back by a compression delay (rule `after`), the next due at "
                       f"{st['next_due']:%Y-%m-%d %H:%M:%S} UTC" if st["delayed"]
                       else "none held back by a compression delay"),
        "commit   " + (", ".join(f"{n} {state.replace('_', ' ')}" for state, n in sorted(st["commitments"].items()))
                           or "no storage commitment requests"),
        "watchdog " + (f"{st['worker_restarts']} compression worker restarts, the last at "
                       f"{st['last_worker_restart']:%Y-%m-%d %H:%M:%S}" if st["worker_restarts"]
                       else "no compression worker restarts"),
        f"failures {st['failures']} recorded" + (", most recent first:" if st["recent_failures"] else ""),
    ]
    for at, stage, uid, reason in st["recent_failures"]:
        lines.append(f"  {at:%Y-%m-%d %H:%M:%S} {stage:8} {uid or '-'}: {reason}")
    return "\n".join(lines) + "\n"
