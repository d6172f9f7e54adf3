"""Weight copies the Triton wrappers keep between calls: tap-major re-layouts and packed ASPP weights.

Without them every call of a frozen or eval-folded weight would pay an extra re-layout kernel and
its launch (docs/design.md §13). A copy is kept while fastaspp._rules allows: only for keepable
weights, valid while every weight is the same object with the same version_stamp; as the copy's
index math depends on the layout, dtype, shape and strides must match too. Entries are weakly keyed
by the first weight, so they die with it.
"""

import weakref

from torch.utils.weak import WeakIdKeyDictionary

from fastaspp._rules import keepable, version_stamp


def _layouts(weights):
    return tuple(version_stamp(w) + (w.dtype, w.shape, w.stride()) for w in weights)


def _stamp(weights):
    """The layouts of all weights, and weak references to all but the first (the key itself)."""
    return _layouts(weights), tuple(weakref.ref(w) for w in weights[1:])


def _stamp_matches(stamp, weights):
    layouts, refs = stamp
    return (len(layouts) == len(weights) and all(r() is w for r, w in zip(refs, weights[1:]))
            and layouts == _layouts(weights))


class KeptCopies:
    """Copies derived from weights, one per (first weight, tag), made by make() when missing or stale."""

    def __init__(self):
        self._by_weight = WeakIdKeyDictionary()

    def get(self, weights, tag, make):
        """make()'s value for `weights` (a sequence of tensors) under `tag` (what the copy is: its
        permutation, say); every call runs make() when a weight is not keepable."""
        if not all(keepable(w) for w in weights):
            return make()
        kept = self._by_weight.setdefault(weights[0], {})
        hit = kept.get(tag)
        if hit is None or not _stamp_matches(hit[0], weights):
            hit = kept[tag] = (_stamp(weights), make())
        return hit[1]

    def owners(self):
        """The first weights that currently have copies (for tests of the keeping rule)."""
        return list(self._by_weight.keys())
