"""``StrategySpec``: a strategy named in a config, with its options (``{name: ils, freeze_ratio: 0.9}``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StrategySpec(BaseModel):
    """``{name: <strategy name>, <option>: <value>, ...}`` for a scorer, scheduler or compressor."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(min_length=1)

    @property
    def options(self) -> dict[str, Any]:
        """The keyword arguments for the strategy's factory (every key but ``name``)."""
        return dict(self.model_extra or {})

    def key(self) -> tuple:
        """A hashable identity: equal specs can share one strategy object."""
        return (self.name, tuple(sorted((k, repr(v)) for k, v in self.options.items())))
