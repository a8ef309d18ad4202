"""Administration (admin-scoped tokens only): garbage collection of the object store, and the
API tokens (list, revoke; a revoked token is refused from the next request on)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from registry.api.deps import AdminDep, RowId, SessionDep, SettingsDep, StoreDep
from registry.models import ApiToken, UtcDateTime
from registry.services.gc import collect_garbage, report_summary
from registry.services.tokens import list_tokens, revoke_token

router = APIRouter(prefix="/admin", tags=["admin"])


class GcRequest(BaseModel):
    """A collection; a dry run (the default) only reports. Periods default to the settings
    (``CKREG_GC_GRACE_S``, ``CKREG_UPLOAD_TTL_S``)."""

    dry_run: bool = True
    grace_s: float | None = Field(default=None, ge=0)
    upload_ttl_s: float | None = Field(default=None, ge=0)
    limit: int = Field(default=1000, ge=0, le=100_000, description="Most keys listed per list.")


class OrphanPublic(BaseModel):
    key: str
    size: int


class GcResult(BaseModel):
    """What was (or, in a dry run, would be) reclaimed; lists are cut to ``limit`` entries."""

    dry_run: bool
    grace_s: float
    upload_ttl_s: float
    scanned: int
    referenced: int
    young: int
    orphan_count: int
    orphan_bytes: int
    orphans: list[OrphanPublic]
    deleted_count: int
    deleted_bytes: int
    kept_on_recheck: list[str]
    stale_uploads: list[str]
    stale_temps: list[str]
    pruned_rows: int
    unresolved_rows: list[str]


@router.post("/gc")
def run_gc(
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    _: AdminDep,
    body: GcRequest | None = None,
) -> GcResult:
    request = body or GcRequest()
    report = collect_garbage(
        session=session,
        store=store,
        grace_s=settings.gc_grace_s if request.grace_s is None else request.grace_s,
        upload_ttl_s=settings.upload_ttl_s
        if request.upload_ttl_s is None
        else request.upload_ttl_s,
        dry_run=request.dry_run,
    )
    return GcResult.model_validate(report_summary(report, limit=request.limit))


class TokenPublic(BaseModel):
    """A token as listed: never its secret or hash."""

    id: int
    name: str
    scopes: list[str]
    revoked: bool
    created_at: UtcDateTime
    last_used_at: UtcDateTime | None


def _token_public(token: ApiToken) -> TokenPublic:
    return TokenPublic(
        id=token.id or 0,
        name=token.name,
        scopes=list(token.scopes),
        revoked=token.revoked,
        created_at=token.created_at,
        last_used_at=token.last_used_at,
    )


@router.get("/tokens")
def get_tokens(session: SessionDep, _: AdminDep) -> list[TokenPublic]:
    """Every token, oldest first (revoked ones included, marked)."""
    return [_token_public(token) for token in list_tokens(session=session)]


@router.delete("/tokens/{token_id}")
def delete_token(token_id: RowId, session: SessionDep, _: AdminDep) -> TokenPublic:
    """Revoke a token: it is refused (401) from the next request on; the row stays, listed."""
    return _token_public(revoke_token(session=session, token_id=token_id))
