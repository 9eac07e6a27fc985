"""The one line under the comparison table: which strategies are best within noise, and what
they cost.

The most accurate strategy (highest mean test accuracy) and every strategy whose paired
difference from it is not significant (`finetune.stats.significance.Bootstrap.pairwise`,
Holm-corrected) are "best within noise"; among those, the cost columns decide — the share of
parameters trained and the time per epoch. Pure functions over plain values, so a results.json
can be re-judged.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from finetune.stats.significance import Pairwise


@attrs.frozen(kw_only=True)
class Candidate:
    """One strategy's summary: mean test accuracy over its runs and its costs."""

    name: str
    accuracy: float
    trainable_share: float  # trainable / all parameters, 0..1
    seconds_per_epoch: float
    runs: int


@attrs.frozen
class Verdict:
    best: tuple[str, ...]  # best within noise, most accurate first
    text: str


def best_within_noise(candidates: Sequence[Candidate],
                      pairs: Sequence[Pairwise]) -> list[Candidate]:
    """The most accurate candidate and every one not significantly worse than it."""
    if not candidates:
        return []
    ranked = sorted(candidates, key=lambda c: -c.accuracy)
    top = ranked[0]
    significant = {frozenset((p.a, p.b)) for p in pairs if p.significant}
    return [top, *(c for c in ranked[1:] if frozenset((top.name, c.name)) not in significant)]


def judge(candidates: Sequence[Candidate], pairs: Sequence[Pairwise]) -> Verdict:
    """The verdict in plain words (see the module docstring)."""
    best = best_within_noise(candidates, pairs)
    if not best:
        return Verdict((), "No finished runs: nothing to judge.")
    names = tuple(c.name for c in best)
    if len(candidates) == 1:
        return Verdict(names, f"Only {best[0].name} ran: nothing to compare it with.")
    method = "(paired bootstrap, 95%, Holm-corrected)"
    if len(best) == 1:
        text = (f"{best[0].name} is the most accurate, ahead of every other strategy beyond "
                f"noise {method}; it trains {_share(best[0])} of the parameters.")
    else:
        text = f"{_join(names)} are tied within noise {method}; {_costs(best)}."
    return Verdict(names, text + _seed_caveat(candidates))


def _costs(tied: Sequence[Candidate]) -> str:
    cheapest = min(tied, key=lambda c: (c.trainable_share, c.seconds_per_epoch))
    fastest = min(tied, key=lambda c: c.seconds_per_epoch)
    slowest = max(tied, key=lambda c: c.seconds_per_epoch)
    ratio = slowest.seconds_per_epoch / max(fastest.seconds_per_epoch, 1e-12)
    if ratio < 1.1:
        return (f"{cheapest.name} trains the fewest parameters ({_share(cheapest)}), and all "
                "run at about the same speed")
    speed = f"{ratio:.1f}× faster than {slowest.name}"
    if cheapest is fastest:
        return f"{cheapest.name} trains {_share(cheapest)} of the parameters and is {speed}"
    return (f"{cheapest.name} trains the fewest parameters ({_share(cheapest)}); "
            f"{fastest.name} is the fastest, {speed}")


def _seed_caveat(candidates: Sequence[Candidate]) -> str:
    if all(c.runs == 1 for c in candidates):
        return (" One run per strategy: only test-set noise is measured, not the seed's "
                "(--seeds 3 or --seeds auto adds it).")
    single = [c.name for c in candidates if c.runs == 1]  # its comparisons lack seed noise
    if single:
        whose = "its" if len(single) == 1 else "their"
        return f" {_join(single)} ran once: {whose} seed-to-seed noise is not measured."
    return ""


def _share(candidate: Candidate) -> str:
    percent = 100 * candidate.trainable_share
    return f"{percent:.1f}%" if percent >= 0.1 else f"{percent:.2g}%"


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
