"""/api/v1/tokens and /api/v1/audit: admin only (scopes tokens:read, tokens:write, audit:read)."""

from __future__ import annotations

from fastapi import APIRouter

from fleet.api.params import (
    AUTHED,
    WITH_BODY,
    ActionQuery,
    ActorQuery,
    BeforeIdQuery,
    LimitQuery,
    RowIdPath,
    TargetQuery,
    error_responses,
)
from fleet.api.schemas import AuditEntryPublic, TokenCreate, TokenCreated, TokenPublic
from fleet.auth import AuditRead, SessionDep, TokensRead, TokensWrite
from fleet.services import audit, tokens

router = APIRouter(tags=["admin"])


@router.post("/tokens", status_code=201, response_model=TokenCreated, responses=error_responses(400, *WITH_BODY))
def create_token(body: TokenCreate, principal: TokensWrite, session: SessionDep) -> TokenCreated:
    """A token with a role, optionally limited to scopes and expiring after `ttl_s` seconds; shown once."""
    plain, row = tokens.create_api_token(session, principal.actor, name=body.name, role=body.role,
                                         scopes=body.scopes, ttl_s=body.ttl_s)
    return TokenCreated(**TokenPublic.model_validate(row).model_dump(), token=plain)


@router.get("/tokens", response_model=list[TokenPublic], responses=error_responses(*AUTHED))
def list_tokens(_: TokensRead, session: SessionDep) -> list[TokenPublic]:
    return [TokenPublic.model_validate(row) for row in tokens.list_api_tokens(session)]


@router.post("/tokens/{token_id}/revoke", response_model=TokenPublic, responses=error_responses(*AUTHED, 404, 409))
def revoke_token(token_id: RowIdPath, principal: TokensWrite, session: SessionDep) -> TokenPublic:
    """409 for the caller's own token and for the last admin token that still works."""
    return TokenPublic.model_validate(
        tokens.revoke_api_token(session, principal.actor, token_id, caller_token_id=principal.token_id))


@router.get("/audit", response_model=list[AuditEntryPublic], responses=error_responses(*AUTHED))
def list_audit(_: AuditRead, session: SessionDep, action: ActionQuery = None, target: TargetQuery = None,
               actor: ActorQuery = None, before_id: BeforeIdQuery = None,
               limit: LimitQuery = 100) -> list[AuditEntryPublic]:
    entries = audit.list_entries(session, action=action, target=target, actor=actor, before_id=before_id, limit=limit)
    return [AuditEntryPublic.model_validate(entry) for entry in entries]
