"""The explorer's web app: Starlette routes and Jinja templates over `lookups.Explorer`. Served by uvicorn
(`fineinstructions explore`); links into the Dagster UI at FINEINSTRUCTIONS_DAGSTER_URL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from fineinstructions_dagster.explore.lookups import Explorer
from fineinstructions_dagster.lib.storage import TableStore
from fineinstructions_dagster.stages.lineage import LineageError

TEMPLATES = Path(__file__).with_name("templates")
PAGE_OF = {"pair": "/pair/", "document": "/document/", "template": "/template/", "query": "/query/"}


def create_app(root: str, dagster_url: str = "http://127.0.0.1:3000") -> Starlette:
    explorer = Explorer(TableStore(root))
    templates = Jinja2Templates(directory=str(TEMPLATES))
    dagster = dagster_url.rstrip("/")

    def run_url(run_id: str | None) -> str:
        return f"{dagster}/runs/{run_id}" if run_id else ""

    def asset_url(asset: str, partition: str | None = None) -> str:
        return f"{dagster}/assets/{asset}" + (f"?view=partitions&partition={quote(partition)}" if partition else "")

    templates.env.globals.update(run_url=run_url, asset_url=asset_url, root=root, dagster=dagster)

    def page(request: Request, name: str, status: int = 200, **context: Any) -> Response:
        return templates.TemplateResponse(request, name, context, status_code=status)

    def missing(request: Request, message: str) -> Response:
        return page(request, "missing.html", status=404, message=message)

    async def index(request: Request) -> Response:
        return page(request, "index.html", shards=explorer.shards())

    async def search(request: Request) -> Response:
        q = request.query_params.get("q", "").strip()
        hits = explorer.search(q)
        if len(hits) == 1:
            return RedirectResponse(PAGE_OF[hits[0]["kind"]] + hits[0]["id"], status_code=303)
        if not hits:
            return missing(request, f"nothing under this root is named {q!r} (an id, a document's url or source "
                                    "id, or a query's source id)")
        return page(request, "search.html", q=q, hits=hits, page_of=PAGE_OF)

    def detail(lookup: Callable[[str], dict[str, Any]], param: str, name: str, key: str) -> Callable[..., Any]:
        """A page of one object: `lookup(id)` rendered by `name` as `key`, or the not-found page naming why."""
        async def endpoint(request: Request) -> Response:
            try:
                found = lookup(request.path_params[param])
            except LineageError as e:
                return missing(request, str(e))
            return page(request, name, **{key: found})
        return endpoint

    return Starlette(routes=[
        Route("/", index), Route("/search", search),
        Route("/pair/{pair_id}", detail(explorer.pair, "pair_id", "pair.html", "c")),
        Route("/document/{doc_id}", detail(explorer.document, "doc_id", "document.html", "d")),
        Route("/template/{template_id}", detail(explorer.template, "template_id", "template.html", "t")),
        Route("/query/{query_id}", detail(explorer.query, "query_id", "query.html", "q")),
        Route("/shard/{shard:path}", detail(explorer.shard, "shard", "shard.html", "s")),
    ])
