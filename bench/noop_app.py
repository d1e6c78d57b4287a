"""Comparator: the cheapest Starlette ingest endpoint, parsing the JSON body and answering 204."""

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def post_events(request: Request) -> Response:
    await request.json()
    return Response(status_code=204)


app = Starlette(routes=[Route("/api/v1/events", post_events, methods=["POST"])])
