"""Exact and near-duplicate removal.

    text ─► normalize_for_dedup ─► exact_key (hash)      ─► seen before?    ─► "exact_duplicate"
        └─► shingles (char n-grams) ─► minhash_signature ─► NearDuplicateIndex ─► "near_duplicate"

The per-record work (`exact_key`, `minhash_signature`) is pure, so that parallel workers (Ray
Data batches) can compute it; the decisions (`Deduplicator`) are sequential, in input order,
so the first of a group of duplicates is the one kept. MinHash and LSH come from datasketch
(Broder 1997; banding as in Leskovec et al., "Mining of Massive Datasets", ch. 3).

Shingles are character n-grams rather than words so that Chinese, written without spaces,
deduplicates as well as English.

Conversations are judged on their user and assistant contents together, with the role of each
turn marked and the system message left out of the text (one persona prompt is shared by
thousands of conversations and would make any two of them look alike). The system message
instead sets the conversation's group (`conversation_group`): only conversations under the same
card are compared, since the same answer in another character's voice is another sample for
role-play SFT, not a copy. RoleBench gives several
different answers to one question: they differ in their exact keys, so none is an exact
duplicate. Near-duplicate detection on whole conversations still merges two answers that share
most of their text with each other, which is the redundancy it is for; different answers stay,
because their answer shingles differ (on RoleBench no two distinct answers to one question
reach a Jaccard similarity of 0.5, let alone the default 0.8).

A preference pair is judged on its prompt, chosen and rejected together (`pair_dedup_text`,
each part marked), in the group of its system message as a conversation is: a copy repeats all
three. Near-dedup runs on that same text rather than on prompt + chosen alone, because pairs
that share a prompt and a chosen answer but reject different answers are distinct comparisons
(a ranked dataset binarized into several pairs per prompt), not copies; near-dedup still merges
pairs that repeat nearly all three. A pair with chosen and rejected swapped is never an exact
duplicate (the parts are marked), but it holds the same texts, so near-dedup counts it as a
near duplicate of the first: the opposite preference over the same answers, which only cancels.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from data_pipeline.records import Conversation, Document, DropReport, PreferencePair

# 64-bit permutations: signatures are uint64, and 32-bit hashes would saturate on very large
# shingle sets (datasketch's "affine32" default inflates similarity there).
_SCHEME = "affine64"
# Shingles are hashed in chunks: update_batch builds a (n_shingles, num_perm) array, which for
# a whole book at once would take gigabytes.
_CHUNK = 8192
_WHITESPACE = re.compile(r"\s+")
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def normalize_for_dedup(text: str) -> str:
    """The form in which two texts are compared: NFC, casefolded, whitespace collapsed to one space.

    Args:
        text: any text.

    Returns:
        The normalised text.
    """
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text).casefold()).strip()


def exact_key(text: str) -> str:
    """The exact-duplicate key of a text: a hash of its normalised form.

    Args:
        text: any text.

    Returns:
        A 32-character hex digest (BLAKE2b, 128 bits: collisions are negligible at any corpus size).
    """
    return hashlib.blake2b(normalize_for_dedup(text).encode("utf-8"), digest_size=16).hexdigest()


def shingles(text: str, ngram: int = 5) -> set[str]:
    """The set of character n-grams of a text's normalised form.

    Args:
        text: any text.
        ngram: the n-gram length.

    Returns:
        The set of shingles; a text shorter than `ngram` is its own single shingle, an empty
        text has none.
    """
    norm = normalize_for_dedup(text)
    if len(norm) <= ngram:
        return {norm} if norm else set()
    return {norm[i : i + ngram] for i in range(len(norm) - ngram + 1)}


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """64-bit hashes of the character n-grams of a text's normalised form, one per distinct shingle.

    The same set as `shingles`, hashed with numpy in one pass (FNV-1a over code points) instead
    of one SHA-1 per shingle in Python, which took most of the deduplication time. The hash is
    fixed, unlike Python's salted hash(), so every worker process agrees.

    Args:
        text: any text.
        ngram: the n-gram length.

    Returns:
        A sorted uint64 array; a text shorter than `ngram` has one shingle, an empty text none.
    """
    codes = np.frombuffer(normalize_for_dedup(text).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) == 0:
        return codes
    n = max(1, len(codes) - ngram + 1)  # number of windows (one for a short text)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    for j in range(min(ngram, len(codes))):
        h = (h ^ codes[j : j + n]) * _FNV_PRIME  # uint64 array arithmetic wraps mod 2**64
    return np.unique(h)


def _prehashed(value: np.uint64) -> np.uint64:
    """datasketch's hashfunc for values that shingle_hashes already hashed."""
    return value


@functools.lru_cache(maxsize=8)
def _empty_minhash(num_perm: int, seed: int) -> MinHash:
    # Drawing the permutations costs about a millisecond; draw them once per (num_perm, seed).
    return MinHash(num_perm=num_perm, seed=seed, hashfunc=_prehashed, scheme=_SCHEME)


def minhash_signature(text: str, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> np.ndarray:
    """The MinHash signature (datasketch) of a text's set of character n-grams.

    A pure function of its arguments, so parallel workers can compute signatures that the
    sequential NearDuplicateIndex then compares.

    Args:
        text: any text.
        num_perm: number of permutations (signature length).
        ngram: the shingle length.
        seed: seed of the permutations; signatures compare only under the same seed.

    Returns:
        A uint64 array of shape (num_perm,).
    """
    m = _empty_minhash(num_perm, seed).copy()
    hashes = shingle_hashes(text, ngram)
    for start in range(0, len(hashes), _CHUNK):
        m.update_batch(hashes[start : start + _CHUNK])
    return m.hashvalues.copy()


def estimated_jaccard(a: np.ndarray, b: np.ndarray, seed: int = 1) -> float:
    """The Jaccard similarity of two shingle sets estimated by datasketch from their signatures.

    Args:
        a: a signature from minhash_signature.
        b: another, with the same num_perm and seed.
        seed: the seed both were made with.

    Returns:
        The estimate in [0, 1].
    """
    return LeanMinHash(seed=seed, hashvalues=a, scheme=_SCHEME).jaccard(
        LeanMinHash(seed=seed, hashvalues=b, scheme=_SCHEME)
    )


class NearDuplicateIndex:
    """A MinHash LSH index that keeps the first of each group of near-duplicate texts.

    Candidates from the LSH bands are confirmed by their estimated Jaccard similarity, because
    banding lets through some pairs below the threshold. That keeps every kept signature in
    memory (num_perm × 8 bytes each, 1 KiB at 128).
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 1):
        """Args:
        threshold: the Jaccard similarity from which two texts are near duplicates.
        num_perm: the signature length, as given to minhash_signature.
        seed: the seed given to minhash_signature.
        """
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold, self.num_perm, self.seed = threshold, num_perm, seed
        # datasketch's default bands (9 bands of 13 rows at 0.8, 128 permutations) make a pair a
        # candidate with probability 0.40 at Jaccard 0.8, 0.69 at 0.85, 0.93 at 0.9 and ~1 from
        # 0.95: near duplicates just above the threshold are often kept. Bands chosen for recall
        # (weights=(0.01, 0.99): ~98.5% at the threshold) were tried and measured; they change
        # which templated lore documents the demo keeps, and its pretraining is at a point where
        # that moves persona accuracy from 0.99 to 0.71 (a threshold of 0.9 did the same), so the
        # default stays until the demo is made robust to its data (see benchmarks/RESULTS.md).
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        # Internal integer ids in the LSH, so that callers' keys need not be unique.
        self._entries: list[tuple[Hashable, LeanMinHash, str]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def _lean(self, signature: np.ndarray) -> LeanMinHash:
        if signature.shape != (self.num_perm,):
            raise ValueError(f"expected a signature of {self.num_perm} values, got shape {signature.shape}")
        return LeanMinHash(seed=self.seed, hashvalues=signature, scheme=_SCHEME)

    def find(self, signature: np.ndarray, group: str = "") -> Hashable | None:
        """The key of an indexed text that `signature` is a near duplicate of, or None.

        Args:
            signature: from minhash_signature.
            group: only texts indexed under the same group are compared (see conversation_group).

        Returns:
            The most similar such key, or None.
        """
        query = self._lean(signature)
        best, best_key = self.threshold, None
        for i in self._lsh.query(query):
            key, lean, other_group = self._entries[i]
            if other_group != group:
                continue
            similarity = query.jaccard(lean)
            if similarity >= best:
                best, best_key = similarity, key
        return best_key

    def add(self, key: Hashable, signature: np.ndarray, group: str = "") -> bool:
        """Index a text unless it is a near duplicate of one already indexed in its group.

        Args:
            key: the caller's name for the text (its source, a row id).
            signature: from minhash_signature.
            group: see `find`.

        Returns:
            True when it is a near duplicate (and was not added), False when it was added.
        """
        if self.find(signature, group) is not None:
            return True
        lean = self._lean(signature)
        self._lsh.insert(len(self._entries), lean, check_duplication=False)
        self._entries.append((key, lean, group))
        return False


class Deduplicator:
    """The sequential decisions: exact duplicates by key, then near duplicates by signature."""

    def __init__(self, near_threshold: float | None = 0.8, num_perm: int = 128, seed: int = 1):
        """Args:
        near_threshold: Jaccard threshold of near duplicates; None turns near-dedup off.
        num_perm: signature length.
        seed: signature seed.
        """
        self._seen: set[tuple[str, str]] = set()
        self.near = NearDuplicateIndex(near_threshold, num_perm, seed) if near_threshold else None

    def check(self, key: Hashable, exact: str, signature: np.ndarray | None, group: str = "") -> str | None:
        """Decide on one record, in input order; a kept record is remembered.

        Args:
            key: the record's name (its source).
            exact: its exact_key.
            signature: its minhash_signature (unused, may be None, when near-dedup is off).
            group: records are duplicates only within one group (conversation_group; "" for documents).

        Returns:
            "exact_duplicate", "near_duplicate", or None to keep it.
        """
        if (group, exact) in self._seen:
            return "exact_duplicate"
        self._seen.add((group, exact))
        if self.near is not None and self.near.add(key, signature, group):
            return "near_duplicate"
        return None


def conversation_dedup_text(conv: Conversation) -> str:
    """The text a conversation is judged on: its user and assistant turns, each marked with its role.

    Args:
        conv: a conversation.

    Returns:
        The text; the system message is left out (see the module docstring).
    """
    return "\n".join(f"{m['role']}: {m['content']}" for m in conv.messages if m["role"] != "system")


def conversation_group(conv: Conversation) -> str:
    """The group a conversation is deduplicated in: the exact_key of its system message, "" without one.

    Args:
        conv: a conversation.

    Returns:
        The group; conversations under different cards are never each other's duplicates.
    """
    system = [m["content"] for m in conv.messages if m["role"] == "system"]
    return exact_key(system[0]) if system else ""


def pair_dedup_text(pair: PreferencePair) -> str:
    """The text a preference pair is judged on: its prompt's user and assistant turns, then the
    chosen and the rejected turns, each line marked with its part and role.

    Args:
        pair: a preference pair.

    Returns:
        The text; the system message is left out (it sets the group, see `pair_group`), and the
        marks keep a pair from equalling the same pair with chosen and rejected swapped.
    """
    parts = (("prompt", pair.prompt), ("chosen", pair.chosen), ("rejected", pair.rejected))
    return "\n".join(f"{part} {m['role']}: {m['content']}" for part, ms in parts for m in ms if m["role"] != "system")


def pair_group(pair: PreferencePair) -> str:
    """The group a preference pair is deduplicated in: as for a conversation, its system card's key.

    Args:
        pair: a preference pair.

    Returns:
        The exact_key of its system message, "" without one.
    """
    return conversation_group(Conversation(pair.prompt, pair.source))


def _dedup(
    records: Iterable,
    text_of: Callable[[Any], str],
    group_of: Callable[[Any], str],
    report: DropReport,
    near_threshold: float | None,
    num_perm: int,
    ngram: int,
) -> Iterator:
    dedup = Deduplicator(near_threshold, num_perm)
    for record in records:
        text = text_of(record)
        signature = minhash_signature(text, num_perm=num_perm, ngram=ngram) if dedup.near is not None else None
        reason = dedup.check(record.source, exact_key(text), signature, group_of(record))
        if reason is not None:
            report.drop(reason, record.source)
            continue
        yield record


def dedup_documents(
    docs: Iterable[Document],
    report: DropReport,
    near_threshold: float | None = 0.8,
    *,
    num_perm: int = 128,
    ngram: int = 5,
) -> Iterator[Document]:
    """Drop documents that repeat an earlier one exactly (after normalisation) or nearly.

    Args:
        docs: cleaned documents, in the order that decides which copy is kept (the first).
        report: where "exact_duplicate" and "near_duplicate" are counted.
        near_threshold: MinHash Jaccard threshold on character n-grams; None for exact only.
        num_perm: MinHash signature length.
        ngram: shingle length in characters.

    Returns:
        An iterator of the documents kept.
    """
    return _dedup(docs, lambda d: d.text, lambda d: "", report, near_threshold, num_perm, ngram)


def dedup_conversations(
    convs: Iterable[Conversation],
    report: DropReport,
    near_threshold: float | None = 0.8,
    *,
    num_perm: int = 128,
    ngram: int = 5,
) -> Iterator[Conversation]:
    """Drop conversations whose user and assistant turns repeat an earlier one's under the same
    system message, exactly or nearly.

    Args:
        convs: cleaned conversations, first copy kept.
        report: where "exact_duplicate" and "near_duplicate" are counted.
        near_threshold: MinHash Jaccard threshold on the conversation_dedup_text; None for exact only.
        num_perm: MinHash signature length.
        ngram: shingle length in characters.

    Returns:
        An iterator of the conversations kept.
    """
    return _dedup(convs, conversation_dedup_text, conversation_group, report, near_threshold, num_perm, ngram)


def dedup_pairs(
    pairs: Iterable[PreferencePair],
    report: DropReport,
    near_threshold: float | None = 0.8,
    *,
    num_perm: int = 128,
    ngram: int = 5,
) -> Iterator[PreferencePair]:
    """Drop preference pairs whose prompt, chosen and rejected repeat an earlier pair's under the
    same system message, exactly or nearly.

    Args:
        pairs: cleaned pairs, first copy kept.
        report: where "exact_duplicate" and "near_duplicate" are counted.
        near_threshold: MinHash Jaccard threshold on the pair_dedup_text; None for exact only.
        num_perm: MinHash signature length.
        ngram: shingle length in characters.

    Returns:
        An iterator of the pairs kept.
    """
    return _dedup(pairs, pair_dedup_text, pair_group, report, near_threshold, num_perm, ngram)
