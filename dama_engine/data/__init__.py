"""Preference data: dataset formats -> canonical :class:`PreferenceRow` -> validated rows -> batches."""

from dama_engine.data.rows import ImageSource, PreferenceRow

__all__ = ["ImageSource", "PreferenceRow"]
