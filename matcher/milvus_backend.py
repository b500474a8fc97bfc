"""A gallery index held by Milvus: the scale-out backend behind GalleryIndex's interface.

When one machine is not enough, the templates live in a Milvus collection (Milvus shards
and replicates it over a cluster and runs FAISS-family indexes itself) and this class gives
the service the same calls as :class:`matcher.index.GalleryIndex`: ``add`` / ``remove`` /
``remove_subject`` / ``replay`` with change sequence numbers, ``search`` returning ranked
subjects (``Hit``), ``search_samples``, ``save`` / ``load``. PostgreSQL stays the source of
truth: the collection is rebuilt or caught up from its change feed exactly like a FAISS
snapshot, and holds nothing that is not in PostgreSQL.

Layout, per gallery (``collection``):

* ``<collection>``: ``sample_id`` (INT64 primary key), ``subject`` (VARCHAR: ``i:<int>`` or
  ``s:<str>`` so int and str keys survive), ``seq`` (INT64), ``vector`` (FLOAT_VECTOR,
  unit length, metric IP = cosine).
* ``<collection>__state``: row ``-1`` holds the change sequence number the collection is
  caught up to (``seq``, written by ``save``); other rows are tombstones ``sample_id -> seq``
  of removals, so an enrolment that loses a race with a deletion cannot resurrect it - on
  this replica or any other sharing the cluster. (Milvus needs a vector field in every
  collection; the state rows carry a 2-d zero vector.)

Guarantees, and how:

* Removed samples are never returned: deletes and searches run at consistency level
  ``Strong`` (Milvus applies every delete acknowledged before the search started).
  Milvus purges deleted rows physically when it compacts segments; ``compact()`` asks for it.
* Late adds: ``add(seq=s)`` skips samples with a tombstone >= s, then checks again after the
  write and deletes what a concurrent removal tombstoned meanwhile (Milvus has no
  transactions; check-write-check closes the race because the remover writes its tombstone
  before it deletes).
* Subjects, not samples: a search groups by ``subject`` on the server (``group_by_field``,
  Milvus >= 2.4 for HNSW / IVF / FLAT indexes); against servers without grouping it falls
  back to over-fetching samples and grouping here, like GalleryIndex.
* Top-k: Milvus caps ``limit`` at 16384; deeper requests are clamped.

Costs to know: ``len`` is a ``count(*)`` query; ``n_subjects`` and ``sample_ids`` scan the
collection (iterator) - fine for tests and tooling, not for every request.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .index import GROWTH, Hit, SubjectKey, _as_ids, _as_key, check_batch, normalize

MILVUS_MAX_TOPK = 16384
STATE_SUFFIX = "__state"
WATERMARK_ID = -1
SUBJECT_MAX_LEN = 1024
INSERT_BATCH = 2000
QUERY_BATCH = 1000
META_FILE = "milvus.json"
DEFAULT_INDEX = {"index_type": "HNSW", "params": {"M": 32, "efConstruction": 128}}
DEFAULT_SEARCH = {"ef": 128}


def encode_subject(key: SubjectKey) -> str:
    key = _as_key(key)
    return f"i:{key}" if isinstance(key, int) else f"s:{key}"


def decode_subject(text: str) -> SubjectKey:
    kind, _, value = text.partition(":")
    return int(value) if kind == "i" else value


def _quote(text: str) -> str:
    """A string literal for a Milvus boolean expression."""
    return json.dumps(text)


class MilvusGalleryIndex:
    """One gallery in a Milvus collection; see the module docstring."""

    def __init__(
        self,
        d: int,
        collection: str,
        *,
        uri: str = "./milvus.db",
        token: str = "",
        client: Any = None,
        index: dict | None = None,
        search_params: dict | None = None,
        overfetch: int = 4,
        group_by: bool | None = None,
    ) -> None:
        """Open the gallery's collection, creating it (with ``index``) if it is new.

        ``uri``: a ``.db`` file for milvus-lite (embedded, tests) or ``http://host:19530``
        for a Milvus server or cluster; ``token`` as Milvus expects (``user:password`` or an
        API key). ``index``: ``{"index_type": ..., "params": {...}}`` of the vector field;
        ``search_params`` the matching search parameters (``ef`` for HNSW, ``nprobe`` for
        IVF). ``group_by`` None: group on the server when it can, else here.
        """
        if d < 1 or overfetch < 1:
            raise ValueError("d and overfetch must be positive")
        if client is None:
            from pymilvus import MilvusClient

            if uri.endswith(".db"):
                Path(uri).parent.mkdir(parents=True, exist_ok=True)
            client = MilvusClient(uri=uri, token=token)
        self.client = client
        self.uri = uri
        self.d = int(d)
        self.collection = collection
        self.state_collection = collection + STATE_SUFFIX
        self.index_spec = dict(index or DEFAULT_INDEX)
        self.search_params = dict(search_params or DEFAULT_SEARCH)
        self.overfetch = int(overfetch)
        self._group_by = group_by
        self.seq = -1
        self._ensure_collections()
        self.seq = self._read_watermark()

    # ------------------------------------------------------------------ GalleryIndex parity

    @property
    def factory(self) -> str:
        return f"milvus:{self.index_spec.get('index_type', 'AUTOINDEX')}"

    @property
    def on_gpu(self) -> bool:
        return str(self.index_spec.get("index_type", "")).upper().startswith("GPU")

    @property
    def removes_in_place(self) -> bool:
        return True  # a delete hides the row at once; compaction drops it physically

    @property
    def garbage(self) -> int:
        return 0

    @property
    def garbage_fraction(self) -> float:
        return 0.0

    def __len__(self) -> int:
        rows = self.client.query(
            self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong"
        )
        return int(rows[0]["count(*)"])

    def __contains__(self, sample_id: object) -> bool:
        if isinstance(sample_id, bool) or not isinstance(sample_id, int | np.integer):
            return False
        return bool(self._get(self.collection, [int(sample_id)], ["sample_id"]))

    @property
    def n_subjects(self) -> int:
        return len({row["subject"] for row in self._scan(["subject"])})

    def sample_ids(self) -> np.ndarray:
        ids = [row["sample_id"] for row in self._scan(["sample_id"])]
        return np.sort(np.asarray(ids, np.int64))

    def train(self, x: ArrayLike) -> None:
        """Milvus trains its own index types when it builds them."""
        normalize(x, self.d)

    # ------------------------------------------------------------------ writes

    def add(
        self,
        x: ArrayLike,
        sample_ids: ArrayLike,
        subjects: Sequence[SubjectKey] | SubjectKey,
        *,
        seq: int | None = None,
    ) -> int:
        """Upsert templates (re-adding a sample replaces it); see GalleryIndex.add."""
        xs, ids, keys = check_batch(x, sample_ids, subjects, self.d, encode_subject)
        if any(len(k) > SUBJECT_MAX_LEN for k in keys):
            raise ValueError(f"subject keys are limited to {SUBJECT_MAX_LEN - 2} characters")
        if seq is not None and len(ids):
            keep = self._not_tombstoned(ids, seq)
            xs, ids, keys = xs[keep], ids[keep], [keys[i] for i in np.flatnonzero(keep)]
        tag = -1 if seq is None else int(seq)
        for i in range(0, len(ids), INSERT_BATCH):
            rows = [
                {"sample_id": int(s), "subject": k, "seq": tag, "vector": v}
                for s, k, v in zip(
                    ids[i : i + INSERT_BATCH].tolist(),
                    keys[i : i + INSERT_BATCH],
                    xs[i : i + INSERT_BATCH],
                    strict=True,
                )
            ]
            self.client.upsert(self.collection, rows)
        n = len(ids)
        if seq is not None and n:
            # A removal may have tombstoned some of them between the check and the write.
            late = ids[~self._not_tombstoned(ids, seq)]
            if late.size:
                self._delete(late)
                n -= len(late)
        self._bump(seq)
        return n

    def remove(self, sample_ids: ArrayLike, *, seq: int | None = None) -> int:
        """Delete samples; unknown ids are ignored. Returns how many existed."""
        ids = np.unique(_as_ids(sample_ids))
        if not ids.size:
            self._bump(seq)
            return 0
        if seq is not None:
            self._remember(ids, seq)
        present = self._existing(ids)
        self._delete(ids)
        self._bump(seq)
        return int(present.size)

    def remove_subject(self, subject: SubjectKey, *, seq: int | None = None) -> int:
        """Cascading delete of every sample of one subject."""
        key = encode_subject(subject)
        rows = self._query(f"subject == {_quote(key)}", ["sample_id"])
        return self.remove(np.asarray([r["sample_id"] for r in rows], np.int64), seq=seq)

    def replay(
        self,
        seq: int,
        added: tuple[ArrayLike, ArrayLike, Sequence[SubjectKey]] | None = None,
        removed: ArrayLike | None = None,
    ) -> None:
        """Apply changes after ``self.seq`` (final states); removals go first and win."""
        if removed is not None:
            self.remove(removed, seq=seq)
        if added is not None:
            x, ids, subjects = added
            if len(_as_ids(ids)):
                self.add(x, ids, subjects, seq=seq)
        self._bump(seq)

    def compact(self) -> int:
        """Ask Milvus to compact (drop deleted rows physically); returns 0 (not counted)."""
        self.client.flush(self.collection)
        compact = getattr(self.client, "compact", None)
        if compact is not None:
            compact(self.collection)
        return 0

    # ------------------------------------------------------------------ search

    def search(self, query: ArrayLike, top_k: int, *, min_score: float | None = None) -> list[Hit]:
        q = np.asarray(query)
        if q.ndim != 1:
            raise ValueError("search takes one vector; use search_batch for several")
        return self.search_batch(q[None, :], top_k, min_score=min_score)[0]

    def search_batch(
        self, queries: ArrayLike, top_k: int, *, min_score: float | None = None
    ) -> list[list[Hit]]:
        """Best ``top_k`` subjects per query, best first (one hit per subject)."""
        q = normalize(queries, self.d)
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        k = min(int(top_k), MILVUS_MAX_TOPK)
        out: list[list[Hit]] = []
        for i in range(0, len(q), QUERY_BATCH):
            chunk = q[i : i + QUERY_BATCH]
            if self._group_by is not False:
                try:
                    res = self._search(chunk, k, group_by_field="subject")
                    self._group_by = True
                    out.extend(self._hits(r, k, min_score) for r in res)
                    continue
                except Exception:  # noqa: BLE001 - a server without grouping search
                    if self._group_by:
                        raise
                    self._group_by = False
            out.extend(self._grouped_here(chunk, k, min_score))
        return out

    def search_samples(
        self, queries: ArrayLike, k: int, *, min_score: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best samples per query: (sample ids, scores), padded with -1 / -inf."""
        q = normalize(queries, self.d)
        if k < 1:
            raise ValueError("k must be >= 1")
        kk = min(int(k), MILVUS_MAX_TOPK)
        ids = np.full((len(q), k), -1, np.int64)
        scores = np.full((len(q), k), -np.inf, np.float32)
        for i in range(0, len(q), QUERY_BATCH):
            res = self._search(q[i : i + QUERY_BATCH], kk)
            for j, hits in enumerate(res):
                row = [(h["sample_id"], h["distance"]) for h in hits]
                if min_score is not None:
                    row = [r for r in row if r[1] >= min_score]
                if row:
                    ids[i + j, : len(row)] = [r[0] for r in row]
                    scores[i + j, : len(row)] = [r[1] for r in row]
        return ids, scores

    def _search(self, q: np.ndarray, k: int, **extra) -> list:
        return self.client.search(
            self.collection,
            data=[v for v in q],
            limit=k,
            output_fields=["subject"],
            search_params={"metric_type": "IP", "params": self.search_params},
            consistency_level="Strong",
            **extra,
        )

    @staticmethod
    def _hits(result, k: int, min_score: float | None) -> list[Hit]:
        hits, seen = [], set()
        for h in result:
            subject = h["entity"]["subject"]
            if subject in seen:
                continue
            if min_score is not None and h["distance"] < min_score:
                break
            seen.add(subject)
            hits.append(Hit(decode_subject(subject), float(h["distance"]), int(h["sample_id"])))
            if len(hits) == k:
                break
        return hits

    def _grouped_here(self, q: np.ndarray, k: int, min_score: float | None) -> list[list[Hit]]:
        """Over-fetch samples and keep each subject's best, growing until k subjects."""
        out: list[list[Hit] | None] = [None] * len(q)
        limit = min(k * self.overfetch, MILVUS_MAX_TOPK)
        pending = np.arange(len(q))
        while pending.size:
            res = self._search(q[pending], limit)
            short = []
            for row, qi in zip(res, pending.tolist(), strict=True):
                hits = self._hits(row, k, min_score)
                floor = min_score is not None and any(h["distance"] < min_score for h in row)
                if len(hits) >= k or floor or len(row) < limit or limit >= MILVUS_MAX_TOPK:
                    out[qi] = hits
                else:
                    short.append(qi)
            pending = np.asarray(short, np.int64)
            limit = min(limit * GROWTH, MILVUS_MAX_TOPK)
        return [h or [] for h in out]

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike | None = None) -> Path | None:
        """Persist: flush the collection and record ``seq`` in Milvus (authoritative for every
        replica); with ``path``, also a small file naming the collection, for ``load``."""
        self.client.flush(self.collection)
        self.client.upsert(
            self.state_collection, [{"id": WATERMARK_ID, "seq": int(self.seq), "v": [0.0, 0.0]}]
        )
        self.client.flush(self.state_collection)
        if path is None:
            return None
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        meta = {
            "backend": "milvus",
            "uri": self.uri,
            "collection": self.collection,
            "d": self.d,
            "index": self.index_spec,
            "search_params": self.search_params,
            "overfetch": self.overfetch,
        }
        tmp = root / f".{META_FILE}.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, root / META_FILE)
        return root

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, token: str = "", client: Any = None
    ) -> MilvusGalleryIndex:
        """Reconnect to a saved gallery; ``seq`` comes from Milvus, then ``replay``."""
        meta = json.loads((Path(path) / META_FILE).read_text())
        return cls(
            meta["d"],
            meta["collection"],
            uri=meta["uri"],
            token=token,
            client=client,
            index=meta["index"],
            search_params=meta["search_params"],
            overfetch=meta["overfetch"],
        )

    def drop(self) -> None:
        """Delete the gallery's collections (a deleted gallery, or a rebuild from scratch)."""
        for name in (self.collection, self.state_collection):
            if self.client.has_collection(name):
                self.client.drop_collection(name)
        self.seq = -1

    # ------------------------------------------------------------------ internals

    def _ensure_collections(self) -> None:
        from pymilvus import DataType, MilvusClient

        c = self.client
        if not c.has_collection(self.collection):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("sample_id", DataType.INT64, is_primary=True)
            schema.add_field("subject", DataType.VARCHAR, max_length=SUBJECT_MAX_LEN)
            schema.add_field("seq", DataType.INT64)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.d)
            params = c.prepare_index_params()
            params.add_index(
                field_name="vector",
                index_type=self.index_spec.get("index_type", "AUTOINDEX"),
                metric_type="IP",
                params=self.index_spec.get("params", {}),
            )
            params.add_index(field_name="subject", index_type="INVERTED")
            c.create_collection(self.collection, schema=schema, consistency_level="Strong")
            # Without waiting: pymilvus would poll every 0.5 s for an index over no rows.
            c.create_index(self.collection, params, sync=False)
        else:
            fields = c.describe_collection(self.collection)["fields"]
            dims = [f["params"].get("dim") for f in fields if f["name"] == "vector"]
            if not dims or int(dims[0]) != self.d:
                raise ValueError(
                    f"collection {self.collection!r} holds vectors of dimension "
                    f"{dims[0] if dims else '?'}, not {self.d}"
                )
        if not c.has_collection(self.state_collection):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("seq", DataType.INT64)
            schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)
            params = c.prepare_index_params()
            params.add_index(field_name="v", index_type="FLAT", metric_type="L2")
            c.create_collection(self.state_collection, schema=schema, consistency_level="Strong")
            c.create_index(self.state_collection, params, sync=False)
        for name in (self.collection, self.state_collection):
            state = c.get_load_state(name)["state"]
            if "NotLoad" in str(state):
                c.load_collection(name)

    def _read_watermark(self) -> int:
        rows = self._get(self.state_collection, [WATERMARK_ID], ["seq"])
        return int(rows[0]["seq"]) if rows else -1

    def _bump(self, seq: int | None) -> None:
        if seq is not None:
            self.seq = max(self.seq, int(seq))

    def _get(self, collection: str, ids: list[int], fields: list[str]) -> list[dict]:
        out = []
        for i in range(0, len(ids), QUERY_BATCH):
            out.extend(
                self.client.get(
                    collection,
                    ids=ids[i : i + QUERY_BATCH],
                    output_fields=fields,
                    consistency_level="Strong",
                )
            )
        return out

    def _query(self, expr: str, fields: list[str]) -> list[dict]:
        """All rows matching ``expr`` (paged by the iterator: Milvus caps query results)."""
        return list(self._scan(fields, expr))

    def _scan(self, fields: list[str], expr: str = ""):
        it = self.client.query_iterator(
            self.collection,
            batch_size=QUERY_BATCH,
            filter=expr,
            output_fields=fields,
            consistency_level="Strong",
        )
        try:
            while True:
                batch = it.next()
                if not batch:
                    return
                yield from batch
        finally:
            it.close()

    def _existing(self, ids: np.ndarray) -> np.ndarray:
        rows = self._get(self.collection, ids.tolist(), ["sample_id"])
        return np.asarray([r["sample_id"] for r in rows], np.int64)

    def _delete(self, ids: np.ndarray) -> None:
        for i in range(0, len(ids), QUERY_BATCH):
            self.client.delete(self.collection, ids=ids[i : i + QUERY_BATCH].tolist())

    def _tombstones(self, ids: np.ndarray) -> dict[int, int]:
        rows = self._get(self.state_collection, [i for i in ids.tolist() if i >= 0], ["seq"])
        return {int(r["id"]): int(r["seq"]) for r in rows}

    def _not_tombstoned(self, ids: np.ndarray, seq: int) -> np.ndarray:
        tomb = self._tombstones(ids)
        return np.asarray([tomb.get(s, seq - 1) < seq for s in ids.tolist()], bool)

    def _remember(self, ids: np.ndarray, seq: int) -> None:
        old = self._tombstones(ids)
        rows = [
            {"id": s, "seq": max(int(seq), old.get(s, int(seq))), "v": [0.0, 0.0]}
            for s in ids.tolist()
            if s >= 0
        ]
        for i in range(0, len(rows), INSERT_BATCH):
            self.client.upsert(self.state_collection, rows[i : i + INSERT_BATCH])
