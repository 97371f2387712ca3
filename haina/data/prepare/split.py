"""Split: train / val / test by content hash, stratified by label.

Within each label (or the whole corpus when there are none) documents are ranked by the 64-bit
BLAKE2b hash of their normalized text; the lowest-ranked go to test, the next to val, the rest to
train. The assignment therefore depends only on the set of documents — not on their order, the
number of workers, the machine or the Python version — and each class gets its exact share.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterable

import numpy as np

_ABOVE_ALL = 1 << 64  # a cutoff no 64-bit hash reaches: the whole group falls below it


def group_key(label) -> str:
    """The stratification group of a label (None for unlabeled documents)."""
    return "" if label is None else json.dumps(label, sort_keys=True)


class SplitPlan:
    """Per-group hash cutoffs: hash < test_cut → test, < val_cut → val, else train."""

    def __init__(self, val_fraction: float, test_fraction: float, groups: dict[str, Iterable[int]]):
        self.cuts: dict[str, tuple[int, int]] = {}
        self.sizes: dict[str, dict[str, int]] = {}
        only_group = len(groups) == 1
        for key, hashes in groups.items():
            # An array('Q') is viewed without a copy; any other iterable of ints is read into one.
            h = np.sort(np.frombuffer(hashes, dtype=np.uint64) if isinstance(hashes, array)
                        else np.fromiter(hashes, dtype=np.uint64))
            n = len(h)
            k_test = round(n * test_fraction)
            k_val = round(n * val_fraction)
            # A small unlabeled corpus still gets a validation document rather than none at all.
            if only_group and val_fraction > 0 and k_val == 0 and n - k_test >= 2:
                k_val = 1
            if test_fraction > 0 and k_test == 0 and only_group and n - k_val >= 3:
                k_test = 1
            test_cut = int(h[k_test]) if k_test < n else _ABOVE_ALL
            val_cut = int(h[k_test + k_val]) if k_test + k_val < n else _ABOVE_ALL
            self.cuts[key] = (test_cut, val_cut)
            self.sizes[key] = {"test": k_test, "val": k_val, "train": n - k_test - k_val}

    def assign(self, label, h: int) -> str:
        """The split ('train', 'val' or 'test') of a document with label `label` and content hash `h`."""
        test_cut, val_cut = self.cuts[group_key(label)]
        if h < test_cut:
            return "test"
        if h < val_cut:
            return "val"
        return "train"
