"""The error every data check raises: what is wrong, and at which site, case and file."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class DataError(Exception):
    """A problem with a site's data, naming where it is.

    Args:
        site: the site's name.
        case: the case id, or None for a site-level problem.
        file: the offending file or folder, or None.
        problem: what is wrong, in words a site's IT person can act on.
    """

    def __init__(self, site: str | None, case: str | None, file: str | Path | None, problem: str) -> None:
        self.site = site
        self.case = case
        self.file = str(file) if file is not None else None
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        where = [f"site {self.site!r}" if self.site else None, f"case {self.case}" if self.case else None, self.file]
        return ": ".join([w for w in where if w] + [self.problem])

    def __reduce__(self):  # keep the attributes through pickling (multiprocessing, NVFlare)
        return (self.__class__, (self.site, self.case, self.file, self.problem))

    def to_record(self) -> dict[str, Any]:
        """JSON-able record, as kept in ``SiteManifest.problems``."""
        return {"site": self.site, "case": self.case, "file": self.file, "problem": self.problem}
