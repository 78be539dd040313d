"""RadixKey: a run of token ids that the radix tree slices and compares without copying (SGLang's ``RadixKey``).

A key is a view ``token_ids[start:end]`` of one Python list. Slicing a key makes another view of
the same list, so walking a request's prompt down the tree or cutting a key at a page boundary
copies no tokens. The tree's own keys are whole lists (:meth:`whole`): a leaf copies its new tokens
once, and a split gives both halves their own lists, so that the frequent comparison of a node with
a request needs one slice (of the request's list), not two. Comparisons run a page at a time in
C: two keys are compared by slicing the lists over the same range (one ``memcmp``-like pass), and
where they differ a binary search over pages finds the first differing page, so no Python loop
ever walks tokens one by one.

A key compares equal to a tuple or list of the same tokens and iterates as ints, so tests and
views can treat it like the tuple it replaces.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from hybridpar.core import Req


class RadixKey:
    """``token_ids[start:end]`` without a copy; ``page(page_size)`` is its index among its siblings."""

    __slots__ = ("token_ids", "start", "end")

    def __init__(self, token_ids: list[int], start: int = 0, end: int | None = None) -> None:
        self.token_ids = token_ids
        self.start = start
        self.end = len(token_ids) if end is None else end

    @classmethod
    def of(cls, key: Sequence[int] | torch.Tensor | RadixKey) -> RadixKey:
        """A view of ``key``: a list is viewed as is (not copied), anything else is read into a list once."""
        if type(key) is RadixKey:
            return key
        if type(key) is list:
            return cls(key)
        if isinstance(key, torch.Tensor):
            return cls(key.tolist())
        return cls(list(map(int, key)))

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            lo, hi, step = index.indices(self.end - self.start)
            if step != 1:
                raise ValueError("a RadixKey slices with step 1 only")
            return RadixKey(self.token_ids, self.start + lo, self.start + max(lo, hi))
        n = self.end - self.start
        if not -n <= index < n:
            raise IndexError(f"token {index} of a {n}-token key")
        return self.token_ids[self.start + index % n]

    def tolist(self) -> list[int]:
        return self.token_ids[self.start:self.end]

    def __iter__(self) -> Iterator[int]:
        return iter(self.tolist())

    def page(self, page_size: int) -> int | tuple[int, ...]:
        """Index of the child that starts with this key: its first token, or its first page as a tuple."""
        if page_size == 1:
            return self.token_ids[self.start]
        return tuple(self.token_ids[self.start:self.start + page_size])

    def whole(self) -> RadixKey:
        """This key over a list of its own (``self`` if it already spans its whole list)."""
        if self.start == 0 and self.end == len(self.token_ids):
            return self
        return RadixKey(self.token_ids[self.start:self.end])

    def match_len(self, other: RadixKey, page_size: int) -> int:
        """Length of the common prefix of two page-aligned keys, in whole pages."""
        n = min(self.end - self.start, other.end - other.start)
        a, b, i, j = self.token_ids, other.token_ids, self.start, other.start
        if (a if i == 0 and n == len(a) else a[i:i + n]) == b[j:j + n]:
            return n  # the common case: one key is a prefix of the other (a whole node key is not sliced)
        lo, hi = 0, n // page_size  # pages [0, lo) agree, pages [0, hi) do not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if a[i + lo * page_size:i + mid * page_size] == b[j + lo * page_size:j + mid * page_size]:
                lo = mid
            else:
                hi = mid
        return lo * page_size

    def _as_list(self, other: Any) -> list[int] | None:
        if isinstance(other, RadixKey):
            return other.tolist()
        return list(other) if isinstance(other, (tuple, list)) else None

    def __eq__(self, other: object) -> bool:
        tokens = self._as_list(other)
        return NotImplemented if tokens is None else self.tolist() == tokens

    def __lt__(self, other: object) -> bool:
        tokens = self._as_list(other)
        return NotImplemented if tokens is None else self.tolist() < tokens

    __hash__ = None  # compares equal to lists, so it cannot hash like a tuple

    def __radd__(self, other: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(other) + tuple(self.tolist())

    def __repr__(self) -> str:
        return f"RadixKey({self.tolist()!r})"


def req_key(req: Req, end: int, start: int = 0) -> RadixKey:
    """Tokens ``[start, end)`` of ``req.all_ids`` as a key: a view of the prompt list when they lie in
    it (no copy), else a copy of just those tokens."""
    ids = req.origin_input_ids
    if type(ids) is list and end <= len(ids):
        return RadixKey(ids, start, end)
    n = len(ids)
    return RadixKey(list(ids[start:]) + req.output_ids[max(start - n, 0):end - n])


def prompt_key(req: Req) -> RadixKey:
    """What admission matches: ``req.all_ids`` but its last token, which is always computed."""
    return req_key(req, max(len(req.origin_input_ids) + len(req.output_ids) - 1, 0))
