"""API tokens: ``ckr_<id>_<secret>`` strings, stored as the sha256 of the secret, with scopes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

from sqlmodel import Session, col, select

from registry.errors import Forbidden, InvalidInput, NotFound, Unauthenticated
from registry.models import ApiToken, TokenScope

TOKEN_PREFIX = "ckr"
INT64_MAX = 2**63 - 1
# What each scope grants: admin implies write implies read.
GRANTS: dict[str, set[TokenScope]] = {
    TokenScope.read: {TokenScope.read},
    TokenScope.write: {TokenScope.read, TokenScope.write},
    TokenScope.admin: {TokenScope.read, TokenScope.write, TokenScope.admin},
}


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(*, session: Session, name: str, scopes: Sequence[str]) -> tuple[ApiToken, str]:
    """Create a token; returns the row and the plaintext ``ckr_<id>_<secret>`` (shown once)."""
    unknown = sorted(set(scopes) - set(GRANTS))
    if unknown or not scopes:
        raise InvalidInput(f"invalid token scopes {list(scopes)}; choose from {sorted(GRANTS)}")
    secret = secrets.token_urlsafe(32)
    token = ApiToken(name=name, token_hash=_hash(secret), scopes=sorted(set(scopes)))
    session.add(token)
    session.commit()
    session.refresh(token)
    return token, f"{TOKEN_PREFIX}_{token.id}_{secret}"


def list_tokens(*, session: Session) -> list[ApiToken]:
    """Every token row (hashes only), oldest first."""
    return list(session.exec(select(ApiToken).order_by(col(ApiToken.id))).all())


def revoke_token(*, session: Session, token_id: int) -> ApiToken:
    """Revoke a token so it no longer authenticates."""
    token = session.get(ApiToken, token_id)
    if token is None:
        raise NotFound(f"token {token_id} not found")
    token.revoked = True
    session.add(token)
    session.commit()
    session.refresh(token)
    return token


def _lookup(session: Session, plaintext: str) -> ApiToken | None:
    prefix, _, rest = plaintext.partition("_")
    token_id, _, secret = rest.partition("_")
    # ASCII digits only ("²".isdigit() is True, int("²") fails), and an id the database holds.
    well_formed = token_id.isascii() and token_id.isdigit() and len(token_id) <= 19
    if prefix != TOKEN_PREFIX or not well_formed or not secret or not plaintext.isascii():
        return None
    if int(token_id) > INT64_MAX:
        return None
    token = session.get(ApiToken, int(token_id))
    if token is None or token.revoked or not hmac.compare_digest(token.token_hash, _hash(secret)):
        return None
    return token


def authenticate(*, session: Session, plaintext: str | None, required: TokenScope) -> ApiToken:
    """The token if it is valid and grants ``required``; ``Unauthenticated``/``Forbidden`` otherwise."""
    if not plaintext:
        raise Unauthenticated(f"this request needs a bearer token with scope '{required}'")
    token = _lookup(session, plaintext)
    if token is None:
        raise Unauthenticated("invalid or revoked token")
    granted = set().union(*(GRANTS.get(scope, set()) for scope in token.scopes))
    if required not in granted:
        raise Forbidden(
            f"token '{token.name}' has scopes {token.scopes}; this request needs '{required}'"
        )
    return token
