"""Functional coverage: named cover points with bins, crosses, and a report of bins hit and missed.

A small stand-in for cocotb-coverage / pyuvm covergroups, shared by the cocotb block testbenches
(``tests/cocotb``) and the conformance corpus (:mod:`npu.conformance`)::

    cov = Coverage("vector unit")
    cov.point("n", {"1": lambda n: n == 1, "2-7": lambda n: 2 <= n < 8, ">=8": lambda n: n >= 8})
    cov.point("op", ["VECTOR", "ELTWISE"])                 # bins are the values themselves
    cov.cross("op x n", ("op", "n"))
    cov.sample(op="VECTOR", n=1)
    print(cov.report()); assert not cov.missed()

A bin that cannot be reached by design is *waived* with the reason, so that "no unexplained
holes" is checkable: :meth:`Coverage.missed` lists only holes that are not waived.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Coverage"]

Bins = Mapping[str, Callable[[Any], bool]] | Sequence[Any]


class _Point:
    def __init__(self, name: str, bins: Bins) -> None:
        self.name = name
        if isinstance(bins, Mapping):
            self.bins: dict[str, Callable[[Any], bool]] = dict(bins)
        else:
            self.bins = {str(v): (lambda x, v=v: x == v) for v in bins}
        if not self.bins:
            raise ValueError(f"cover point {name!r} needs at least one bin")

    def hit(self, value: Any) -> list[str]:
        return [label for label, pred in self.bins.items() if pred(value)]


class Coverage:
    """A covergroup: cover points, crosses of them, hit counts, waivers, and a report."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._points: dict[str, _Point] = {}
        self._crosses: dict[str, tuple[str, ...]] = {}
        self.hits: dict[str, dict[str, int]] = {}
        self.waived: dict[str, dict[str, str]] = {}
        self.samples = 0

    # Definition ----------------------------------------------------------------------------
    def point(self, name: str, bins: Bins, *, waive: Mapping[str, str] | None = None) -> None:
        """A cover point over the value sampled under ``name``; ``bins`` maps labels to
        predicates, or lists the values (each its own bin). ``waive`` maps bin labels that
        cannot be hit to the reason."""
        if name in self.hits:
            raise ValueError(f"cover point {name!r} defined twice")
        self._points[name] = p = _Point(name, bins)
        self.hits[name] = dict.fromkeys(p.bins, 0)
        self._waive(name, waive)

    def cross(self, name: str, points: Sequence[str], *,
              waive: Mapping[str, str] | None = None) -> None:
        """The cross product of the bins of ``points`` (labels joined by ``" x "``)."""
        missing = [p for p in points if p not in self._points]
        if missing or len(points) < 2:
            raise ValueError(f"cross {name!r} needs two or more defined points, "
                             f"unknown: {missing}")
        if name in self.hits:
            raise ValueError(f"cover point {name!r} defined twice")
        self._crosses[name] = tuple(points)
        labels = itertools.product(*(self._points[p].bins for p in points))
        self.hits[name] = {" x ".join(combo): 0 for combo in labels}
        self._waive(name, waive)

    def _waive(self, name: str, waive: Mapping[str, str] | None) -> None:
        unknown = [b for b in (waive or {}) if b not in self.hits[name]]
        if unknown:
            raise ValueError(f"{name!r}: cannot waive unknown bin(s) {unknown}")
        self.waived[name] = dict(waive or {})

    # Sampling ------------------------------------------------------------------------------
    def sample(self, **values: Any) -> None:
        """Record one observation; points not named in ``values`` are not sampled (nor the
        crosses that use them)."""
        self.samples += 1
        hit: dict[str, list[str]] = {}
        for name, value in values.items():
            point = self._points.get(name)
            if point is None:
                raise KeyError(f"{self.name}: no cover point {name!r}")
            hit[name] = point.hit(value)
            for label in hit[name]:
                self.hits[name][label] += 1
        for name, points in self._crosses.items():
            if all(p in hit for p in points):
                for combo in itertools.product(*(hit[p] for p in points)):
                    self.hits[name][" x ".join(combo)] += 1

    def merge(self, other: Coverage | Mapping[str, Any]) -> None:
        """Add the hit counts of another coverage of the same shape (object or :meth:`to_dict`)."""
        data = other.to_dict() if isinstance(other, Coverage) else other
        for name, bins in data["hits"].items():
            for label, count in bins.items():
                if name in self.hits and label in self.hits[name]:
                    self.hits[name][label] += int(count)
        self.samples += int(data.get("samples", 0))

    # Results -------------------------------------------------------------------------------
    def missed(self) -> list[str]:
        """``point: bin`` of every bin never hit and not waived (the unexplained holes)."""
        return [f"{name}: {label}" for name, bins in self.hits.items()
                for label, count in bins.items()
                if not count and label not in self.waived[name]]

    def counts(self) -> tuple[int, int, int]:
        """(bins hit, bins waived and not hit, bins in total)."""
        total = sum(len(b) for b in self.hits.values())
        hit = sum(1 for b in self.hits.values() for c in b.values() if c)
        waived = sum(1 for name, b in self.hits.items() for label, c in b.items()
                     if not c and label in self.waived[name])
        return hit, waived, total

    def report(self, *, verbose: bool = False) -> str:
        """A table: per point, bins hit / total, then the missed and waived bins by name
        (``verbose``: every bin with its count)."""
        hit, waived, total = self.counts()
        lines = [f"coverage {self.name}: {hit}/{total} bins hit, {waived} waived, "
                 f"{total - hit - waived} missed ({self.samples} samples)"]
        for name, bins in self.hits.items():
            n_hit = sum(1 for c in bins.values() if c)
            lines.append(f"  {name:28s} {n_hit:4d}/{len(bins):<4d}")
            for label, count in bins.items():
                if verbose:
                    lines.append(f"      {label:40s} {count}")
                elif not count:
                    why = self.waived[name].get(label)
                    lines.append(f"      {'waived' if why else 'MISSED'}: {label}"
                                 + (f" ({why})" if why else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "samples": self.samples, "hits": self.hits,
                "waived": self.waived}

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON (the testbenches leave one file per block)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))

    @staticmethod
    def load_hits(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
        """The saved coverage files that exist."""
        return [json.loads(Path(p).read_text()) for p in paths if Path(p).exists()]
