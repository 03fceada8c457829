"""/api/v1/tokens and /api/v1/audit: admin only."""

from __future__ import annotations

from fastapi import APIRouter, Query

from fleet.api.schemas import AuditEntryPublic, TokenCreate, TokenCreated, TokenPublic
from fleet.auth import AdminDep, SessionDep
from fleet.services import audit, tokens

router = APIRouter(tags=["admin"])


@router.post("/tokens", status_code=201, response_model=TokenCreated)
def create_token(body: TokenCreate, principal: AdminDep, session: SessionDep) -> TokenCreated:
    plain, row = tokens.create_api_token(session, principal.actor, name=body.name, role=body.role)
    return TokenCreated(**TokenPublic.model_validate(row).model_dump(), token=plain)


@router.get("/tokens", response_model=list[TokenPublic])
def list_tokens(_: AdminDep, session: SessionDep) -> list[TokenPublic]:
    return [TokenPublic.model_validate(row) for row in tokens.list_api_tokens(session)]


@router.post("/tokens/{token_id}/revoke", response_model=TokenPublic)
def revoke_token(token_id: int, principal: AdminDep, session: SessionDep) -> TokenPublic:
    return TokenPublic.model_validate(tokens.revoke_api_token(session, principal.actor, token_id))


@router.get("/audit", response_model=list[AuditEntryPublic])
def list_audit(_: AdminDep, session: SessionDep, action: str | None = None, target: str | None = None,
               actor: str | None = None, before_id: int | None = None,
               limit: int = Query(default=100, ge=1, le=audit.MAX_PAGE)) -> list[AuditEntryPublic]:
    entries = audit.list_entries(session, action=action, target=target, actor=actor, before_id=before_id, limit=limit)
    return [AuditEntryPublic.model_validate(entry) for entry in entries]
