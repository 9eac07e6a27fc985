"""Choosing on validation data: the search (`search`: a space of values raced under a
stopping rule; the lr by default) and the advisor (`advisor`: where to stop freezing, each
depth's lr chosen by that search)."""

from finetune.tuning.search import LrSearch, Selection, Tuning

__all__ = ["LrSearch", "Selection", "Tuning"]
