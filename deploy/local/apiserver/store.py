"""SQLite storage of API objects and of the event history watches resume from.

Theory of operation: one global ``resourceVersion`` counter, like etcd's revision.
Every write (create, update, delete) takes the next number, stores the object's new
state in ``objects`` and appends one row to ``events`` with the object before and
after.  A watch from version R replays ``events`` with rv > R; because the history
lives in the same database as the objects and is written in the same transaction,
a restarted server resumes watches exactly.  History is bounded: only the newest
``retain_events`` rows are kept; a watch older than the oldest kept row gets 410.  So
does a watch from a version this store never reached: the database was replaced under a
client that outlived it, and only a fresh list gives that client the truth.

The store is synchronous and does no network I/O: the HTTP layer calls it from the
trio thread (a write is one short transaction) and wakes watchers after each write.
"""

from __future__ import annotations

import copy
import json
import random
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from common.kube.resources import RESOURCES, ResourceType, by_kind

from . import status

EventType = Literal["ADDED", "MODIFIED", "DELETED"]

# Kubernetes draws generateName suffixes from this alphabet (no vowels, no look-alikes).
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    grp TEXT NOT NULL, plural TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    rv INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (grp, plural, namespace, name));
CREATE TABLE IF NOT EXISTS events (
    rv INTEGER PRIMARY KEY, grp TEXT NOT NULL, plural TEXT NOT NULL, namespace TEXT NOT NULL,
    type TEXT NOT NULL, body TEXT NOT NULL, prev TEXT);
CREATE INDEX IF NOT EXISTS events_by_resource ON events (grp, plural, rv);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class StoredEvent:
    """One write, as a watch replays it; ``previous`` is None for ADDED."""

    rv: int
    type: EventType
    object: dict[str, Any]
    previous: dict[str, Any] | None


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ns_key(rt: ResourceType, namespace: str | None) -> str:
    return (namespace or "") if rt.namespaced else ""


def _without_volatile(obj: dict[str, Any]) -> dict[str, Any]:
    """The object minus fields that change on every write, to detect no-op updates."""
    clean = copy.deepcopy(obj)
    meta = clean.get("metadata", {})
    meta.pop("resourceVersion", None)
    meta.pop("managedFields", None)
    return clean


class Store:
    """Objects and their history in one SQLite file (see the module docstring)."""

    def __init__(self, path: str | Path, *, retain_events: int = 10_000) -> None:
        if retain_events < 1:
            raise ValueError("retain_events must be at least 1")
        self._retain = retain_events
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        # WAL with synchronous=NORMAL: a crash can lose the last writes but never corrupts,
        # and writes do not wait for an fsync (the local cluster is not a production etcd).
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._rv = self._meta("rv")
        self._compacted = self._meta("compacted")
        row = self._db.execute("SELECT COUNT(*) FROM events").fetchone()
        self._event_count = int(row[0])

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One atomic write; on failure the database and the counters are left as before."""
        saved = (self._rv, self._compacted, self._event_count)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            self._rv, self._compacted, self._event_count = saved
            raise
        self._db.execute("COMMIT")

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion handed out."""
        return self._rv

    @property
    def compacted(self) -> int:
        """Watches from a version below this one get 410 (their history was dropped)."""
        return self._compacted

    # -- reads ---------------------------------------------------------------------------

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT body FROM objects WHERE grp=? AND plural=? AND namespace=? AND name=?",
            (rt.group, rt.plural, _ns_key(rt, namespace), name)).fetchone()
        return json.loads(row[0]) if row else None

    def list_objects(self, rt: ResourceType,
                     namespace: str | None) -> tuple[list[dict[str, Any]], int]:
        """Objects of ``rt`` (in ``namespace``, or everywhere when None) and the list's rv."""
        if rt.namespaced and namespace is not None:
            rows = self._db.execute(
                "SELECT body FROM objects WHERE grp=? AND plural=? AND namespace=? "
                "ORDER BY namespace, name", (rt.group, rt.plural, namespace)).fetchall()
        else:
            rows = self._db.execute(
                "SELECT body FROM objects WHERE grp=? AND plural=? ORDER BY namespace, name",
                (rt.group, rt.plural)).fetchall()
        return [json.loads(r[0]) for r in rows], self._rv

    def events_since(self, rt: ResourceType, namespace: str | None,
                     rv: int) -> list[StoredEvent]:
        """Writes to ``rt`` after ``rv``, oldest first; 410 when that history is gone."""
        if rv < self._compacted:
            raise status.expired(rv, self._compacted)
        if rv > self._rv:
            raise status.from_the_future(rv, self._rv)
        query = ("SELECT rv, type, body, prev FROM events WHERE grp=? AND plural=? AND rv>?")
        args: tuple[Any, ...] = (rt.group, rt.plural, rv)
        if rt.namespaced and namespace is not None:
            query += " AND namespace=?"
            args += (namespace,)
        rows = self._db.execute(query + " ORDER BY rv", args).fetchall()
        return [StoredEvent(int(r[0]), r[1], json.loads(r[2]),
                            json.loads(r[3]) if r[3] else None) for r in rows]

    def types_written_since(self, rv: int) -> set[tuple[str, str]]:
        """The (group, plural) of every object written after version ``rv``."""
        rows = self._db.execute("SELECT DISTINCT grp, plural FROM events WHERE rv > ?",
                                (rv,)).fetchall()
        return {(str(r[0]), str(r[1])) for r in rows}

    # -- writes --------------------------------------------------------------------------

    def create(self, rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        """Store a validated new object; fills uid, creationTimestamp, resourceVersion."""
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        namespace = meta.get("namespace") if rt.namespaced else None
        if namespace is not None and self.get(by_kind("Namespace"), None, namespace) is None:
            raise status.not_found(by_kind("Namespace"), namespace)
        if not meta.get("name"):
            meta["name"] = self._generate_name(rt, namespace, meta["generateName"])
        elif self.get(rt, namespace, meta["name"]) is not None:
            raise status.already_exists(rt, meta["name"])
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        for volatile in ("deletionTimestamp", "managedFields", "selfLink"):
            meta.pop(volatile, None)
        if rt.kind == "Namespace":
            obj.setdefault("status", {}).setdefault("phase", "Active")
        with self._transaction():
            self._write(rt, "ADDED", obj, None)
        return obj

    def _generate_name(self, rt: ResourceType, namespace: str | None, prefix: str) -> str:
        for _ in range(100):
            name = prefix + "".join(random.choices(_SUFFIX_ALPHABET, k=5))
            if self.get(rt, namespace, name) is None:
                return name
        raise status.already_exists(rt, prefix)  # pragma: no cover - 27^5 names per prefix

    def update(self, rt: ResourceType, obj: dict[str, Any], *,
               status_only: bool = False) -> dict[str, Any]:
        """Replace an object (or, with ``status_only``, only its status).

        A ``metadata.resourceVersion`` in ``obj`` must equal the stored one (409 Conflict
        otherwise); without it the update is unconditional, as for most Kubernetes kinds.
        Writes through the main resource keep the stored status; an update that changes
        nothing stores nothing and returns the stored object.
        """
        meta = obj["metadata"]
        namespace = meta.get("namespace") if rt.namespaced else None
        old = self.get(rt, namespace, meta["name"])
        if old is None:
            raise status.not_found(rt, meta["name"])
        wanted_rv = meta.get("resourceVersion")
        if wanted_rv not in (None, "") and str(wanted_rv) != old["metadata"]["resourceVersion"]:
            raise status.conflict(rt, meta["name"])
        if status_only:
            new = copy.deepcopy(old)
            if "status" in obj:
                new["status"] = copy.deepcopy(obj["status"])
            else:
                new.pop("status", None)
        else:
            new = copy.deepcopy(obj)
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
            new_meta = new["metadata"]
            for kept in ("uid", "creationTimestamp", "generation", "deletionTimestamp"):
                if kept in old["metadata"]:
                    new_meta[kept] = old["metadata"][kept]
                else:
                    new_meta.pop(kept, None)
            if self._content(new) != self._content(old):
                new_meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if _without_volatile(new) == _without_volatile(old):
            return old
        with self._transaction():
            self._write(rt, "MODIFIED", new, old)
        return new

    @staticmethod
    def _content(obj: dict[str, Any]) -> dict[str, Any]:
        """What ``metadata.generation`` counts changes of: everything but metadata and status."""
        return {k: v for k, v in obj.items() if k not in ("metadata", "status")}

    def delete(self, rt: ResourceType, namespace: str | None, name: str, *,
               precondition_uid: str | None = None,
               precondition_rv: str | None = None) -> dict[str, Any]:
        """Delete an object now and return its last state; a Namespace takes its objects along."""
        old = self.get(rt, namespace, name)
        if old is None:
            raise status.not_found(rt, name)
        if (precondition_uid and precondition_uid != old["metadata"].get("uid")) or (
                precondition_rv and precondition_rv != old["metadata"].get("resourceVersion")):
            raise status.conflict(rt, name)
        with self._transaction():
            if rt.kind == "Namespace":
                for inner in RESOURCES:
                    if inner.namespaced:
                        for child in self.list_objects(inner, name)[0]:
                            self._write(inner, "DELETED", child, child)
            return self._write(rt, "DELETED", old, old)

    def _write(self, rt: ResourceType, kind: EventType, obj: dict[str, Any],
               previous: dict[str, Any] | None) -> dict[str, Any]:
        """Take the next resourceVersion, store ``obj`` and its event (inside a transaction)."""
        self._rv += 1
        if kind == "DELETED":
            obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._rv)
        meta = obj["metadata"]
        ns = _ns_key(rt, meta.get("namespace"))
        body = json.dumps(obj, separators=(",", ":"))
        if kind == "DELETED":
            self._db.execute(
                "DELETE FROM objects WHERE grp=? AND plural=? AND namespace=? AND name=?",
                (rt.group, rt.plural, ns, meta["name"]))
        else:
            self._db.execute("INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?,?)",
                             (rt.group, rt.plural, ns, meta["name"], self._rv, body))
        self._db.execute("INSERT INTO events VALUES (?,?,?,?,?,?,?)",
                         (self._rv, rt.group, rt.plural, ns, kind, body,
                          json.dumps(previous, separators=(",", ":")) if previous else None))
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('rv', ?)", (self._rv,))
        self._event_count += 1
        if self._event_count > self._retain:
            self._compact()
        return obj

    def _compact(self) -> None:
        """Drop the oldest events beyond the retention bound (inside the caller's transaction)."""
        row = self._db.execute("SELECT rv FROM events ORDER BY rv DESC LIMIT 1 OFFSET ?",
                               (self._retain,)).fetchone()
        if row is None:
            return
        self._db.execute("DELETE FROM events WHERE rv <= ?", (row[0],))
        self._compacted = int(row[0])
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('compacted', ?)", (self._compacted,))
        self._event_count = self._retain
