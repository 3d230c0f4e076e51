"""The pydantic base classes every kubehv API model derives from.

Why this module exists: all models share one configuration (camelCase names on the wire,
snake_case in Python, either accepted on input), and specs additionally refuse unknown
fields, so a typo in Python code fails as loudly as it fails at the API server.
"""

from __future__ import annotations

from typing import Any

import pydantic
from pydantic.alias_generators import to_camel


class ApiModel(pydantic.BaseModel):
    """Base of status and nested models: camelCase aliases, unknown fields ignored."""

    model_config = pydantic.ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        use_attribute_docstrings=False,
    )

    def to_dict(self) -> dict[str, Any]:
        """The wire form: camelCase keys, JSON types, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StrictModel(ApiModel):
    """Base of spec models: unknown fields are an error (as at the API server)."""

    model_config = pydantic.ConfigDict(extra="forbid")
