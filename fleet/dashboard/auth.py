"""Dashboard sign-in: the admin token buys a signed session cookie; every action carries a CSRF token.

The session cookie is ``<session id>.<expiry>.<mac>``, signed with a key derived from the admin token, so
the service keeps no session table, a restart keeps people signed in, and changing the admin token signs
everyone out. Sign-out revokes the session id in memory (until it would have expired anyway).

CSRF: each session has its own token, ``HMAC(key, "csrf:" + session id)``, put in every form (field
``csrf_token``) and in a ``<meta>`` tag for scripts (header ``X-CSRF-Token``). The sign-in form, which
has no session yet, uses a double-submit cookie instead. The cookie is also ``SameSite=Strict``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

SESSION_COOKIE = "nf_session"
LOGIN_CSRF_COOKIE = "nf_login_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SESSION_TTL_S = 12 * 3600


@dataclass(frozen=True)
class DashboardSession:
    sid: str
    expires: int
    csrf: str


class SessionSigner:
    def __init__(self, admin_token: str, ttl_s: int = SESSION_TTL_S) -> None:
        self._key = hmac.new(admin_token.encode(), b"nanofleet-dashboard-session/1", hashlib.sha256).digest()
        self._admin_token = admin_token.encode()
        self.ttl_s = ttl_s
        self._revoked: dict[str, int] = {}
        self._lock = threading.Lock()

    def _mac(self, msg: str) -> str:
        return hmac.new(self._key, msg.encode(), hashlib.sha256).hexdigest()

    def token_ok(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.strip().encode(), self._admin_token)

    def issue(self, now: float | None = None) -> tuple[str, DashboardSession]:
        sid = secrets.token_urlsafe(18)
        expires = int((now or time.time()) + self.ttl_s)
        body = f"{sid}.{expires}"
        return f"{body}.{self._mac(body)}", DashboardSession(sid, expires, self.csrf_for(sid))

    def check(self, cookie: str | None, now: float | None = None) -> DashboardSession | None:
        if not cookie:
            return None
        parts = cookie.split(".")
        if len(parts) != 3:
            return None
        sid, exp, mac = parts
        if not hmac.compare_digest(mac, self._mac(f"{sid}.{exp}")):
            return None
        try:
            expires = int(exp)
        except ValueError:
            return None
        t = now or time.time()
        if expires <= t:
            return None
        with self._lock:
            if sid in self._revoked:
                return None
        return DashboardSession(sid, expires, self.csrf_for(sid))

    def revoke(self, session: DashboardSession) -> None:
        with self._lock:
            now = time.time()
            self._revoked = {k: v for k, v in self._revoked.items() if v > now}
            self._revoked[session.sid] = session.expires

    def csrf_for(self, sid: str) -> str:
        return self._mac("csrf:" + sid)

    def csrf_ok(self, session: DashboardSession, candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(str(candidate), session.csrf)


class LoginThrottle:
    """At most ``limit`` failed sign-ins per client address in ``window_s``: a token guesser is slowed."""

    def __init__(self, limit: int = 10, window_s: float = 300.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._fails: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        q = self._fails.setdefault(client, deque())
        while q and q[0] < now - self.window_s:
            q.popleft()
        return q

    def blocked(self, client: str) -> bool:
        with self._lock:
            return len(self._recent(client, time.monotonic())) >= self.limit

    def failed(self, client: str) -> None:
        with self._lock:
            self._recent(client, time.monotonic()).append(time.monotonic())

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._fails.pop(client, None)


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path on this site only (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
