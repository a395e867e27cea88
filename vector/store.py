"""The template store: protected templates in pgvector, PostgreSQL being the source of truth.

Bulk paths use binary COPY both ways: enrolment copies rows in, warm-up streams every template of a
model out and parses the fixed-width binary rows with NumPy (no per-row Python), so 1M templates load
in seconds. ``search`` is the cold path (and the benchmark peer) over the per-model HNSW index.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql

_PGCOPY_HEADER = 19  # signature (11) + flags (4) + header extension length (4)
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_model_name(model: str) -> str:
    """Model names end up as SQL literals in partial-index predicates: allow a safe alphabet only."""
    if not _MODEL_RE.match(model):
        raise ValueError(f"invalid model name {model!r}")
    return model


@dataclass
class TemplateBatch:
    """Rows of one model as parallel arrays (what the hot index and the feed carry)."""

    labels: np.ndarray  # int64 (n,)
    subjects: np.ndarray  # uint8 (n, 16): subject uuid bytes
    encodings: np.ndarray  # uint8 (n, 16): encoding uuid bytes
    templates: np.ndarray  # float32 (n, dim), unit norm

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def empty(cls, dim: int) -> TemplateBatch:
        return cls(np.empty(0, np.int64), np.empty((0, 16), np.uint8), np.empty((0, 16), np.uint8),
                   np.empty((0, dim), np.float32))

    @classmethod
    def concat(cls, parts: list[TemplateBatch], dim: int) -> TemplateBatch:
        if not parts:
            return cls.empty(dim)
        return cls(np.concatenate([p.labels for p in parts]), np.concatenate([p.subjects for p in parts]),
                   np.concatenate([p.encodings for p in parts]), np.concatenate([p.templates for p in parts]))

    def take(self, mask_or_index: np.ndarray) -> TemplateBatch:
        return TemplateBatch(self.labels[mask_or_index], self.subjects[mask_or_index],
                             self.encodings[mask_or_index], self.templates[mask_or_index])


def uuids_to_bytes(ids: list[uuid.UUID]) -> np.ndarray:
    return np.frombuffer(b"".join(u.bytes for u in ids), dtype=np.uint8).reshape(-1, 16)


def _row_dtype(dim: int) -> np.dtype:
    """One binary COPY row of (label int8, subject_id uuid, id uuid, template vector(dim))."""
    return np.dtype([
        ("nfields", ">i2"), ("l_label", ">i4"), ("label", ">i8"), ("l_subject", ">i4"), ("subject", "V16"),
        ("l_enc", ">i4"), ("enc", "V16"), ("l_vec", ">i4"), ("vdim", ">i2"), ("vunused", ">i2"),
        ("vec", ">f4", (dim,)),
    ])


def load_templates(
    conn: psycopg.Connection, model: str, dim: int, version: int, column: str = "template",
    labels: np.ndarray | None = None,
) -> TemplateBatch:
    """Stream the protected templates of one model and version out of PostgreSQL with binary COPY.

    ``labels`` restricts the load to those labels (re-sync of a few missing rows).
    """
    dtype = _row_dtype(dim)
    where = sql.SQL("model = {} AND template_version = {}").format(sql.Literal(model), sql.Literal(version))
    if labels is not None:
        where = sql.SQL("{} AND label = ANY({})").format(where, sql.Literal([int(x) for x in labels]))
    query = sql.SQL("COPY (SELECT label, subject_id, id, {}::vector({}) FROM encodings WHERE {}) "
                    "TO STDOUT (FORMAT BINARY)").format(sql.Identifier(column), sql.Literal(dim), where)
    parts: list[np.ndarray] = []
    buf = bytearray()
    skipped_header = False
    with conn.cursor() as cur, cur.copy(query) as copy:
        for chunk in copy:
            buf += chunk
            if not skipped_header:
                if len(buf) < _PGCOPY_HEADER:
                    continue
                del buf[:_PGCOPY_HEADER]
                skipped_header = True
            whole = (len(buf) // dtype.itemsize) * dtype.itemsize
            if whole >= 4 << 20:
                parts.append(np.frombuffer(bytes(buf[:whole]), dtype=dtype))
                del buf[:whole]
    whole = (len(buf) // dtype.itemsize) * dtype.itemsize
    if whole:
        parts.append(np.frombuffer(bytes(buf[:whole]), dtype=dtype))
    if not parts:
        return TemplateBatch.empty(dim)
    rows = np.concatenate(parts)
    return TemplateBatch(
        labels=rows["label"].astype(np.int64),
        subjects=np.frombuffer(rows["subject"].tobytes(), np.uint8).reshape(-1, 16),
        encodings=np.frombuffer(rows["enc"].tobytes(), np.uint8).reshape(-1, 16),
        templates=np.ascontiguousarray(rows["vec"], dtype=np.float32),
    )


def model_labels(conn: psycopg.Connection, model: str) -> np.ndarray:
    """Every label of a model (any order), for the diff-based re-sync: one bytea of big-endian int8s
    built by the server, because a Python tuple per row costs ~1 s at 1M encodings on the restart path."""
    row = conn.execute("SELECT string_agg(int8send(label), ''::bytea) FROM encodings WHERE model = %s",
                       (model,), binary=True).fetchone()
    raw = row[0] if row is not None and row[0] is not None else b""
    return np.frombuffer(raw, ">i8").astype(np.int64)


def allocate_labels(conn: psycopg.Connection, n: int) -> np.ndarray:
    rows = conn.execute("SELECT nextval('encoding_label_seq') FROM generate_series(1, %s)", (n,)).fetchall()
    return np.array([r[0] for r in rows], dtype=np.int64)


def copy_encodings(
    conn: psycopg.Connection, ids: list[uuid.UUID], labels: np.ndarray, subject_ids: list[uuid.UUID],
    model: str, version: int, sealed: list[bytes], templates: np.ndarray, templates_next: np.ndarray | None = None,
) -> None:
    """Insert encodings with binary COPY (the caller's transaction holds the matching audit records).

    ``templates_next``: during a template-key rotation, the template under the pending version too.
    """
    with conn.cursor() as cur, cur.copy(
        "COPY encodings (id, label, subject_id, model, template_version, raw_sealed, template, template_next) "
        "FROM STDIN (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["uuid", "int8", "uuid", "text", "int4", "bytea", "vector", "vector"])
        for i in range(len(ids)):
            nxt = templates_next[i] if templates_next is not None else None
            copy.write_row((ids[i], int(labels[i]), subject_ids[i], model, version, sealed[i], templates[i], nxt))


def next_feed_seq(conn: psycopg.Connection, model: str) -> tuple[int, int, int | None]:
    """Take the model's feed row lock (held to commit); returns (feed_seq, template_version, rotating_to).

    Take it last in a write transaction: it serialises the writers of one model for their final
    statements only, and makes feed_seq follow commit order.
    """
    row = conn.execute(
        "UPDATE index_state SET feed_seq = feed_seq + 1, updated_at = now() WHERE model = %s "
        "RETURNING feed_seq, template_version, rotating_to",
        (model,),
    ).fetchone()
    if row is None:
        raise LookupError(f"model {model!r} has no index_state row")
    return int(row[0]), int(row[1]), (int(row[2]) if row[2] is not None else None)


def feed_position(conn: psycopg.Connection, model: str) -> tuple[int, int] | None:
    row = conn.execute("SELECT feed_seq, template_version FROM index_state WHERE model = %s", (model,)).fetchone()
    return (int(row[0]), int(row[1])) if row else None


def hnsw_index_name(model: str) -> str:
    return "encodings_hnsw_" + re.sub(r"[^a-z0-9]+", "_", check_model_name(model).lower())


def ensure_hnsw_index(conn: psycopg.Connection, model: str, dim: int, m: int = 16, ef_construction: int = 64) -> None:
    """Create the model's partial HNSW index if missing (owner role: the service role cannot)."""
    conn.execute(sql.SQL(
        "CREATE INDEX IF NOT EXISTS {} ON encodings USING hnsw ((template::vector({})) vector_ip_ops) "
        "WITH (m = {}, ef_construction = {}) WHERE model = {}"
    ).format(sql.Identifier(hnsw_index_name(model)), sql.Literal(dim), sql.Literal(m), sql.Literal(ef_construction),
             sql.Literal(check_model_name(model))))


def search(
    conn: psycopg.Connection, model: str, dim: int, template: np.ndarray, k: int, ef_search: int = 64,
) -> list[tuple[int, uuid.UUID, uuid.UUID, float]]:
    """Cold-path top-k by inner product through pgvector HNSW: (label, subject_id, encoding_id, similarity).

    The model is inlined as a literal so the planner can match the partial index predicate.
    """
    query = sql.SQL(
        "SELECT label, subject_id, id, -((template::vector({d})) <#> %(q)s::vector({d})) FROM encodings "
        "WHERE model = {m} ORDER BY (template::vector({d})) <#> %(q)s::vector({d}) LIMIT %(k)s"
    ).format(d=sql.Literal(dim), m=sql.Literal(check_model_name(model)))
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(int(ef_search))))
        rows = conn.execute(query, {"q": np.asarray(template, np.float32), "k": k}).fetchall()
    return [(int(r[0]), r[1], r[2], float(r[3])) for r in rows]


def search_active(
    conn: psycopg.Connection, model: str, dim: int, version: int, template: np.ndarray, limit: int,
    exclude: list[int], timeout_ms: int,
) -> tuple[list[tuple[int, bytes, bytes, float]], int, int]:
    """The cold path while a hot index warms: top-``limit`` by inner product over the model's protected
    templates (version ``version``) of *active* subjects, ``exclude`` labels (tombstones) left out;
    returns rows (label, subject id bytes, encoding id bytes, similarity), how many rows were looked at
    (before dropping those of subjects being erased), and the model's feed position.

    Exact unless the operator created a pgvector HNSW index (the planner then may use it). Bounded by
    ``timeout_ms`` (``statement_timeout``), so a slow scan fails instead of piling up requests.
    """
    # The top rows first, then the states of their subjects only (not a join over every row)
    query = sql.SQL(
        "WITH top AS (SELECT label, subject_id, id, (template::vector({d})) <#> %(q)s::vector({d}) AS d "
        "FROM encodings WHERE model = {m} AND template_version = %(v)s AND label <> ALL(%(x)s) "
        "ORDER BY (template::vector({d})) <#> %(q)s::vector({d}) LIMIT %(k)s) "
        "SELECT top.label, top.subject_id, top.id, -top.d, s.state = 'active' FROM top "
        "JOIN subjects s ON s.id = top.subject_id ORDER BY top.d"
    ).format(d=sql.Literal(dim), m=sql.Literal(check_model_name(model)))
    with conn.transaction():
        _statement_timeout(conn, timeout_ms)
        rows = conn.execute(query, {"q": np.asarray(template, np.float32), "v": version, "k": limit,
                                    "x": exclude}).fetchall()
        seq = _feed_seq(conn, model)
    live = [(int(r[0]), r[1].bytes, r[2].bytes, float(r[3])) for r in rows if r[4]]
    return live, len(rows), seq


def newer_and_live(
    conn: psycopg.Connection, model: str, dim: int, version: int, template: np.ndarray, after: int,
    labels: list[int], timeout_ms: int,
) -> tuple[list[tuple[int, bytes, bytes, float]], set[int], int]:
    """For a cold search over templates loaded up to label ``after``: the model's rows added since, scored
    against ``template`` (an index range scan: few rows), the subset of ``labels`` plus those rows that
    still exist and belong to active subjects, and the model's feed position."""
    query = sql.SQL(
        "SELECT label, subject_id, id, -((template::vector({d})) <#> %(q)s::vector({d})) FROM encodings "
        "WHERE model = {m} AND label > %(after)s AND template_version = %(v)s"
    ).format(d=sql.Literal(dim), m=sql.Literal(check_model_name(model)))
    with conn.transaction():
        _statement_timeout(conn, timeout_ms)
        newer = [(int(r[0]), r[1].bytes, r[2].bytes, float(r[3])) for r in conn.execute(
            query, {"q": np.asarray(template, np.float32), "after": after, "v": version}).fetchall()]
        live = {int(r[0]) for r in conn.execute(
            "SELECT e.label FROM encodings e JOIN subjects s ON s.id = e.subject_id "
            "WHERE e.label = ANY(%s) AND e.model = %s AND s.state = 'active'",
            ([*labels, *(r[0] for r in newer)], model)).fetchall()}
        seq = _feed_seq(conn, model)
    return newer, live, seq


def _statement_timeout(conn: psycopg.Connection, timeout_ms: int) -> None:
    """Bound the rest of this transaction's statements (the cold path answers or fails, never piles up)."""
    conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(max(1, int(timeout_ms)))))


def _feed_seq(conn: psycopg.Connection, model: str) -> int:
    """The model's feed position as of this transaction (0 before its index_state row exists)."""
    pos = feed_position(conn, model)
    return pos[0] if pos else 0
