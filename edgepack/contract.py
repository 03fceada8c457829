"""The base of edgepack's JSON contracts (manifest, report): frozen pydantic models whose optional sections are
left out when absent instead of written as null, so a document keeps exactly the keys it has always had.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_serializer


class ContractModel(BaseModel):
    """A frozen contract model; fields named in `omit_when_none` are dropped from the dump when they are None."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Optional fields written only when set: their keys never appeared as null in the documents.
    omit_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_absent(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in self.omit_when_none:
            if data.get(key, ...) is None:
                del data[key]
        return data
