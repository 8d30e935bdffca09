"""What the backend decided for each site, as records that report(), inspect and warnings read.

Policy goes in (`policy.py`), decisions come out: the backend (lowering/) writes one `Decision`
per site it saw, including attention it could not make a site (nn.MultiheadAttention whose
weights are used). Readers select by field (`kind`, `dense`), never by the wording of a reason,
so a reworded message changes what is printed and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

SiteKind = Literal["attention", "linear"]


@dataclass(frozen=True)
class Decision:
    """One site's outcome: the sparse method it runs, or why it stays dense."""

    site: str  # site name (owning module path); an attention and a linear site may share one
    kind: SiteKind
    dense: bool  # no sparse kernel will run at this site
    what: str  # what runs: "SPION-CF", "2:4", "unstructured", ... or "dense"
    reason: str = ""  # why it stays dense ("" when sparse)

    @classmethod
    def sparse(cls, site: str, kind: SiteKind, what: str) -> Decision:
        return cls(site, kind, False, what)

    @classmethod
    def kept_dense(cls, site: str, kind: SiteKind, reason: str) -> Decision:
        return cls(site, kind, True, "dense", reason)

    def __str__(self) -> str:
        return f"{self.what}: {self.reason}" if self.reason else self.what


def decision_for(decisions: Iterable[Decision], site: str, kind: SiteKind) -> Decision | None:
    """The decision recorded for `site` of `kind` (the last one, if recorded twice)."""
    found = None
    for decision in decisions:
        if decision.site == site and decision.kind == kind:
            found = decision
    return found
