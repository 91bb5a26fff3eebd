"""A teacher bank: labelled slide-level teacher embeddings selected by SQL, and the sampling of triplets from it.

The bank is the only thing the unpaired objectives know about the teacher cohort. Any query whose
result has an ``embedding`` column (``FLOAT[dim]`` or a list) and a label column builds one, e.g. the
mean tile embeddings of another cohort,

    SELECT e.embedding, l.grade FROM slide_emb_efficientnet_lite0 e JOIN labels l USING (slide_id)

or the slide embeddings a trained head wrote to the ``predictions`` table (``fs predict``). Positives
share the anchor's label (and bin of a secondary column when one is given); negatives are
*adjacent* labels (|Δ| = ``gap``), the confusable neighbours GUIDE-US pushed away from, or the
hardest item of another label found with FAISS.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa

from featurestore.distill.errors import ConfigError
from featurestore.store import Store


@dataclass(frozen=True, eq=False)
class TeacherBank:
    """``embeddings`` (n, D) L2-normalised float32, ``labels`` (n,) integers, ``bins`` (n,) secondary bins
    (all 0 without a secondary column)."""

    embeddings: np.ndarray
    labels: np.ndarray
    bins: np.ndarray

    def __post_init__(self) -> None:
        if not len(self.embeddings) == len(self.labels) == len(self.bins):
            raise ConfigError("teacher bank columns differ in length")
        norms = np.linalg.norm(self.embeddings, axis=1, keepdims=True)
        object.__setattr__(self, "embeddings", (self.embeddings / np.maximum(norms, 1e-12)).astype(np.float32))

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.labels)


def load_bank(store: Store, query: str, label: str, *, secondary: str | None = None,
              edges: tuple[float, ...] = ()) -> TeacherBank:
    """Run ``query`` on ``store`` and keep rows with an embedding and an integer ``label``.

    ``secondary`` (e.g. ``tumour_fraction``) is cut at ``edges`` into bins; positives are then drawn
    from the anchor's label *and* bin.
    """
    table = store.sql(query)
    need = ["embedding", label, *([secondary] if secondary else [])]
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise ConfigError(f"{store.root}: the bank query returns no column {missing[0]!r} (it returns "
                          f"{', '.join(table.column_names)}); select it, e.g. SELECT e.embedding, l.{label} ...")
    keep = np.ones(table.num_rows, bool)
    for name in need:
        keep &= np.array([v is not None for v in table.column(name).to_pylist()], bool)
    table = table.filter(pa.array(keep))
    if table.num_rows == 0:
        raise ConfigError(f"{store.root}: the bank query returned no row with an embedding and a {label!r} label")
    labels = _integers(table.column(label).to_pylist(), label, store)
    embeddings = np.asarray(table.column("embedding").to_pylist(), np.float32)
    bins = np.zeros(len(labels), np.int64)
    if secondary:
        bins = np.digitize(np.asarray(table.column(secondary).to_pylist(), np.float64), edges)
    return TeacherBank(embeddings, labels, bins)


def _integers(values: list, name: str, store: Store) -> np.ndarray:
    try:
        out = np.asarray(values, np.float64)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{store.root}: bank label {name!r} is not numeric (e.g. {values[0]!r}); "
                          "choose an integer class or grade column") from err
    if not np.all(out == np.round(out)):
        raise ConfigError(f"{store.root}: bank label {name!r} must hold integer classes or grades")
    return out.astype(np.int64)


class TripletSampler:
    """Draws bank indices of positives and negatives for anchors given by (label, bin).

    A positive is a random item with the anchor's label and bin, falling back to the label alone when
    that bin is empty. An adjacent negative is a random item whose label differs by exactly ``gap``;
    when the bank has none (grade 0 with no grade 1), the nearest other label is used instead. With
    ``hard=True`` the negative is the item of another label most similar to the anchor embedding
    (FAISS inner product on L2-normalised vectors, i.e. cosine).
    """

    def __init__(self, bank: TeacherBank, *, gap: int = 1, hard: bool = False) -> None:
        if gap < 1:
            raise ConfigError(f"negative label gap must be >= 1, got {gap}")
        self.bank = bank
        self.gap = gap
        self.hard = hard
        self._by_label = {int(c): np.flatnonzero(bank.labels == c) for c in np.unique(bank.labels)}
        self._by_cell = {(int(c), int(b)): np.flatnonzero((bank.labels == c) & (bank.bins == b))
                         for c, b in set(zip(bank.labels.tolist(), bank.bins.tolist(), strict=True))}
        self._index: faiss.IndexFlatIP | None = None
        if hard:
            self._index = faiss.IndexFlatIP(bank.dim)
            self._index.add(bank.embeddings)

    def check_labels(self, labels: np.ndarray) -> None:
        """Every anchor label needs a positive and the bank needs a second label for negatives."""
        absent = sorted(set(np.asarray(labels).astype(int).tolist()) - set(self._by_label))
        if absent:
            raise ConfigError(f"the teacher bank has no item with label {absent[0]} (it has "
                              f"{sorted(self._by_label)}); widen the bank query or drop those slides")
        if len(self._by_label) < 2:
            raise ConfigError("the teacher bank holds a single label; triplets need at least two")

    def positives(self, labels: np.ndarray, bins: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.empty(len(labels), np.int64)
        for i, (c, b) in enumerate(zip(labels.astype(int).tolist(), bins.astype(int).tolist(), strict=True)):
            pool = self._by_cell.get((c, b))
            out[i] = rng.choice(pool if pool is not None and pool.size else self._by_label[c])
        return out

    def negative_labels(self, label: int) -> list[int]:
        """Labels a negative may have: those at distance ``gap``, else the nearest ones."""
        others = [c for c in self._by_label if c != label]
        exact = [c for c in others if abs(c - label) == self.gap]
        if exact:
            return exact
        nearest = min(abs(c - label) for c in others)
        return [c for c in others if abs(c - label) == nearest]

    def negatives(self, labels: np.ndarray, rng: np.random.Generator,
                  anchors: np.ndarray | None = None) -> np.ndarray:
        if self.hard:
            if anchors is None:
                raise ConfigError("hard negatives need the anchor embeddings")
            return self._hardest(labels, anchors)
        out = np.empty(len(labels), np.int64)
        for i, c in enumerate(labels.astype(int).tolist()):
            pool = np.concatenate([self._by_label[n] for n in self.negative_labels(c)])
            out[i] = rng.choice(pool)
        return out

    def _hardest(self, labels: np.ndarray, anchors: np.ndarray) -> np.ndarray:
        """Searching one more item than the largest label holds guarantees one of another label."""
        assert self._index is not None
        query = np.ascontiguousarray(anchors / np.maximum(np.linalg.norm(anchors, axis=1, keepdims=True), 1e-12),
                                     np.float32)
        k = min(len(self.bank), 1 + max(len(v) for v in self._by_label.values()))
        _, found = self._index.search(query, k)
        out = np.empty(len(labels), np.int64)
        for i, c in enumerate(labels.astype(int).tolist()):
            row = found[i][found[i] >= 0]
            out[i] = row[self.bank.labels[row] != c][0]
        return out
