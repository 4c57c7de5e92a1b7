"""Bearer tokens with scopes: who may search, who may change the index.

A token file holds one token per line, after its scope:

    # comments and blank lines are ignored
    search 6f1c...   a search client (several lines per scope: rotate by adding the new one, then removing the old)
    admin  9b2e...   an operator: the Admin service, and Search too

Scopes are `search` and `admin`. The admin scope includes search; the search scope never includes admin. A line
holding a token alone (the one-token files of earlier versions) is an admin token. Tokens are compared in constant
time against every token of the file. `asymsearch serve` reads the file again on SIGHUP (`TokenStore.reload`): a
file that no longer parses is refused and the tokens in use stay.

Nothing here ever puts a token, or any other content of the file, in a message: errors name the line number.
"""
from __future__ import annotations

import dataclasses
import hmac
import os
import threading
from pathlib import Path
from typing import Iterable

from asymsearch.core.errors import UserError

SEARCH, ADMIN = "search", "admin"
SCOPES = (SEARCH, ADMIN)
IMPLIES = {ADMIN: {ADMIN, SEARCH}, SEARCH: {SEARCH}}  # what a token of each scope may do


@dataclasses.dataclass(frozen=True)
class Tokens:
    """(token, scope) pairs; `scopes_of(given)` is what `given` may do (empty: not a token of this set)."""

    entries: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for token, scope in self.entries:
            if scope not in SCOPES:
                raise UserError(f"unknown token scope {scope!r}; scopes are {', '.join(SCOPES)}")
            if not token or any(c.isspace() for c in token):
                raise UserError("a token must be non-empty and hold no spaces")

    @classmethod
    def of(cls, admin: Iterable[str] = (), search: Iterable[str] = ()) -> "Tokens":
        return cls(tuple((t, ADMIN) for t in admin) + tuple((t, SEARCH) for t in search))

    def scopes_of(self, given: str) -> set[str]:
        allowed: set[str] = set()
        given_bytes = given.encode()
        for token, scope in self.entries:  # every entry is compared: the time does not depend on which matched
            if hmac.compare_digest(given_bytes, token.encode()):
                allowed |= IMPLIES[scope]
        return allowed

    def has(self, scope: str) -> bool:
        return any(scope in IMPLIES[s] for _, s in self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def read_token_file(path: str | os.PathLike) -> Tokens:
    """Parse a token file (module docstring); `UserError` naming the file and line, never its content."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"token file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the token file {path} ({e.__class__.__name__})") from None
    entries = []
    for n, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) == 1:
            entries.append((words[0], ADMIN))
        elif len(words) == 2 and words[0] in SCOPES:
            entries.append((words[1], words[0]))
        else:
            raise UserError(f"token file {path} line {n}: expected 'SCOPE TOKEN' with SCOPE one of "
                            f"{', '.join(SCOPES)} (or a token alone, an admin token)")
    if not entries:
        raise UserError(f"the token file {path} holds no token")
    return Tokens(tuple(entries))


class TokenStore:
    """The tokens in use, replaced as a whole on reload (readers take one consistent set)."""

    def __init__(self, tokens: Tokens, path: str | os.PathLike | None = None) -> None:
        self._tokens = tokens
        self.path = Path(path) if path else None
        self._lock = threading.Lock()

    @property
    def tokens(self) -> Tokens:
        return self._tokens

    def reload(self) -> Tokens:
        """Read the file again; raises `UserError` (and keeps the tokens in use) when it does not parse."""
        if self.path is None:
            raise UserError("these tokens were not read from a file; nothing to reload")
        fresh = read_token_file(self.path)
        with self._lock:
            self._tokens = fresh
        return fresh
