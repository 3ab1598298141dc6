"""Keep passwords in URLs out of what branchnas saves and prints.

A storage URL such as ``postgresql://user:secret@host/db`` may carry a password. The recipe
saved in the run directory, the reports, the logs and the terminal only ever see it masked
(``postgresql://user:***@host/db``); the password itself is best kept out of the recipe
altogether, in ``PGPASSWORD`` or ``~/.pgpass``, which the database driver reads.

Example:
    >>> mask_url("postgresql://ann:s3cret@db.lan:5432/optuna")
    'postgresql://ann:***@db.lan:5432/optuna'
    >>> mask_url("sqlite:///runs/shapes/tune-study/study.db")
    'sqlite:///runs/shapes/tune-study/study.db'
"""

from __future__ import annotations

import re

__all__ = ["mask_url", "has_password"]

# scheme://user:password@  (the password runs to the last '@' before the host)
_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<password>[^\s/]*)(?P<tail>@)")


def mask_url(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL in it replaced by ``***``."""
    return _PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", text)


def has_password(url: str) -> bool:
    """True when ``url`` carries a password."""
    return bool(_PASSWORD.search(url))
