"""The admin REST API: users, teams, keys, budgets, prices and usage reports.

Mounted by the gateway under `/admin`; every route needs `Authorization: Bearer <admin key>`.
Errors use OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import dataclasses
import hmac
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from lmgate.admin import schemas as sc
from lmgate.storage import budgets, keys, prices, reports, users
from lmgate.storage.db import Database
from lmgate.storage.errors import StorageError
from lmgate.storage.timeutil import parse_duration, parse_time, utcnow

_bearer = HTTPBearer(auto_error=False, description="the admin key (auth.admin_key)")
_CODES = {400: "invalid_value", 401: "invalid_admin_key", 403: "admin_disabled", 404: "not_found"}
_TYPES = {401: "authentication_error", 403: "permission_error", 500: "server_error"}


class AdminError(Exception):
    """An error answered in OpenAI's envelope."""

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or _CODES.get(status, "conflict" if status == 409 else "error")

    def response(self) -> JSONResponse:
        err_type = _TYPES.get(self.status, "invalid_request_error")
        body = {"message": self.message, "type": err_type, "param": self.param, "code": self.code}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": body}, status_code=self.status, headers=headers)


def build_admin_app(db: Database, admin_key: str | None) -> FastAPI:
    """The admin API over `db`; with no admin key every request is refused with 403."""

    async def authorize(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if not admin_key:
            raise AdminError(
                403,
                "The admin API is disabled: set an admin key with auth.admin_key in the "
                "configuration or LMGATE_ADMIN_KEY in the environment.",
            )
        given = creds.credentials if creds else ""
        if not hmac.compare_digest(given.encode(), admin_key.encode()):
            raise AdminError(401, "Missing or invalid admin key (Authorization: Bearer ...).")

    app = FastAPI(
        title="lmgate admin API",
        version="1",
        docs_url=None,  # Swagger UI and ReDoc load from CDNs; clusters are offline
        redoc_url=None,
        openapi_url=None,  # FastAPI's own route would skip `authorize`: served below instead
        dependencies=[Depends(authorize)],
    )
    app.state.db = db
    _install_error_handlers(app)
    for router in (_users, _teams, _keys, _budgets, _prices, _usage):
        app.include_router(router)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        """The OpenAPI description, with the mount point (`/admin`) as its server."""
        schema = app.openapi()
        root_path = request.scope.get("root_path", "").rstrip("/")
        if root_path:
            schema = {**schema, "servers": [{"url": root_path}]}
        return JSONResponse(schema)

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AdminError)
    async def _admin(_: Request, e: AdminError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StorageError)
    async def _storage(_: Request, e: StorageError) -> JSONResponse:
        return AdminError(e.status, e.message, param=e.param).response()

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        return AdminError(e.status_code, str(e.detail), code=None).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ())]
        param = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
        message = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        return AdminError(400, message, param=param or None).response()


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


DB = Annotated[Database, Depends(_db)]
_users = APIRouter(prefix="/users", tags=["users"])
_teams = APIRouter(prefix="/teams", tags=["teams"])
_keys = APIRouter(prefix="/keys", tags=["keys"])
_budgets = APIRouter(prefix="/budgets", tags=["budgets"])
_prices = APIRouter(prefix="/prices", tags=["prices"])
_usage = APIRouter(tags=["usage"])


@_users.post("", status_code=201, response_model=sc.UserOut)
async def create_user(db: DB, body: sc.UserCreate) -> users.UserView:
    """Create a user; its team, if given, must exist."""
    return await users.create_user(db, **body.model_dump())


@_users.get("", response_model=sc.DataList[sc.UserOut])
async def list_users(db: DB, team: str | None = None) -> dict[str, object]:
    """Every user, or a team's users."""
    return {"data": await users.list_users(db, team)}


@_users.get("/{name}", response_model=sc.UserOut)
async def get_user(db: DB, name: str) -> users.UserView:
    """One user."""
    return await users.get_user(db, name)


@_users.patch("/{name}", response_model=sc.UserOut)
async def update_user(db: DB, name: str, body: sc.UserUpdate) -> users.UserView:
    """Change a user's email, role, team, disabled or log_bodies flag."""
    return await users.update_user(db, name, **body.model_dump(exclude_unset=True))


@_users.delete("/{name}", status_code=204, response_class=Response)
async def delete_user(db: DB, name: str) -> None:
    """Delete a user and its keys; the ledger keeps its records."""
    await users.delete_user(db, name)


@_teams.post("", status_code=201, response_model=sc.TeamOut)
async def create_team(db: DB, body: sc.TeamCreate) -> users.TeamView:
    """Create a team."""
    return await users.create_team(db, body.name)


@_teams.get("", response_model=sc.DataList[sc.TeamOut])
async def list_teams(db: DB) -> dict[str, object]:
    """Every team with its member count."""
    return {"data": await users.list_teams(db)}


@_teams.get("/{name}", response_model=sc.TeamDetail)
async def get_team(db: DB, name: str) -> dict[str, object]:
    """A team and its members."""
    members = await users.team_members(db, name)
    team = next(t for t in await users.list_teams(db) if t.name == name)
    return {**dataclasses.asdict(team), "users": members}


@_teams.delete("/{name}", status_code=204, response_class=Response)
async def delete_team(db: DB, name: str) -> None:
    """Delete a team; its members stay, without a team."""
    await users.delete_team(db, name)


@_keys.post("", status_code=201, response_model=sc.KeyCreated)
async def create_key(db: DB, body: sc.KeyCreate) -> sc.KeyCreated:
    """Create a key; the response holds its secret, which is never shown again."""
    row, secret = await keys.create_key(
        db,
        body.user,
        name=body.name,
        expires_in=parse_duration(body.expires_in, "expires_in") if body.expires_in else None,
        models=body.models,
        budget=(body.budget.amount, body.budget.period) if body.budget else None,
        log_bodies=body.log_bodies,
        limits=body.limits.model_dump(exclude_none=True) if body.limits else None,
    )
    view = sc.KeyOut.model_validate(await keys.get_key(db, row.prefix))
    return sc.KeyCreated(**view.model_dump(), key=secret)


@_keys.get("", response_model=sc.DataList[sc.KeyOut])
async def list_keys(
    db: DB, user: str | None = None, include_revoked: bool = False
) -> dict[str, object]:
    """Keys, newest first; revoked ones only with include_revoked=true."""
    return {"data": await keys.list_keys(db, user, include_revoked)}


@_keys.get("/{prefix}", response_model=sc.KeyOut)
async def get_key(db: DB, prefix: str) -> keys.KeyView:
    """One key by its prefix."""
    return await keys.get_key(db, prefix)


@_keys.post("/{prefix}/revoke", response_model=sc.KeyOut)
async def revoke_key(db: DB, prefix: str) -> keys.KeyView:
    """Revoke a key: gateways refuse it within a second."""
    return await keys.revoke_key(db, prefix)


Scope = Literal["key", "user", "team"]


async def _budget_out(db: Database, b: budgets.BudgetView) -> sc.BudgetOut:
    now = utcnow()
    start = budgets.period_start(b.period, now)
    return sc.BudgetOut(
        scope=b.scope,
        name=b.name,
        amount=b.amount,
        period=b.period,
        spent=await budgets.spent(db, b.scope, b.scope_id, start),
        period_start=start,
        resets_at=budgets.next_reset(b.period, now),
        updated_at=b.updated_at,
    )


@_budgets.get("", response_model=sc.DataList[sc.BudgetOut])
async def list_budgets(db: DB, scope: Scope | None = None) -> dict[str, object]:
    """Every budget, with what was spent in the current period."""
    return {"data": [await _budget_out(db, b) for b in await budgets.list_budgets(db, scope)]}


@_budgets.put("/{scope}/{ref}", response_model=sc.BudgetOut)
async def set_budget(db: DB, scope: Scope, ref: str, body: sc.BudgetIn) -> sc.BudgetOut:
    """Set the budget of a key (by prefix), a user or a team (by name)."""
    return await _budget_out(db, await budgets.set_budget(db, scope, ref, body.amount, body.period))


@_budgets.get("/{scope}/{ref}", response_model=sc.BudgetOut)
async def get_budget(db: DB, scope: Scope, ref: str) -> sc.BudgetOut:
    """A budget and what was spent in its current period."""
    return await _budget_out(db, await budgets.get_budget(db, scope, ref))


@_budgets.delete("/{scope}/{ref}", status_code=204, response_class=Response)
async def delete_budget(db: DB, scope: Scope, ref: str) -> None:
    """Remove a budget."""
    await budgets.delete_budget(db, scope, ref)


@_prices.get("", response_model=sc.DataList[sc.PriceOut])
async def list_prices(db: DB) -> dict[str, object]:
    """Every price override."""
    return {"data": await prices.list_prices(db)}


@_prices.put("/{model:path}", response_model=sc.PriceOut)
async def set_price(db: DB, model: str, body: sc.PriceIn) -> object:
    """Set a model's price in US dollars per million tokens."""
    return await prices.set_price(db, model, **body.model_dump())


@_prices.get("/{model:path}", response_model=sc.PriceOut)
async def get_price(db: DB, model: str) -> object:
    """A model's price override."""
    return await prices.get_price(db, model)


@_prices.delete("/{model:path}", status_code=204, response_class=Response)
async def delete_price(db: DB, model: str) -> None:
    """Remove a model's price override."""
    await prices.delete_price(db, model)


@_usage.get("/usage", response_model=sc.UsageReport, responses={200: {"content": {"text/csv": {}}}})
async def usage(
    db: DB,
    by: Literal["user", "team", "key", "model"] = "user",
    since: Annotated[str, Query(description="a duration ago (30d) or an ISO date")] = "30d",
    until: Annotated[str | None, Query(description="exclusive end; default: now")] = None,
    format: Literal["json", "csv"] = "json",
) -> object:
    """Requests, tokens, cost and errors per user, team, key or model."""
    now = utcnow()
    start = parse_time(since, now, "since")
    end = parse_time(until, now, "until") if until else None
    rows = await reports.usage_report(db, by, start, end)
    if format == "csv":
        return Response(reports.report_csv(rows), media_type="text/csv; charset=utf-8")
    return {"by": by, "since": start, "until": end, "data": rows}
