"""Comparator: one transaction per request (upsert the student, insert the event, commit,
publish), on the service's schema through `databases`, the way a first version would."""

import datetime as dt
import os
from pathlib import Path

import orjson
import redis.asyncio as aioredis
from databases import Database
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema.sql"
CHANNEL = "telemetry:naive"

UPSERT_STUDENT = """
INSERT INTO students (student_id, name, course_id, team, first_seen, last_seen)
VALUES (:student_id, :name, :course_id, :team, :seen, :seen)
ON CONFLICT (student_id) DO UPDATE SET
    name = COALESCE(excluded.name, students.name),
    course_id = COALESCE(excluded.course_id, students.course_id),
    team = COALESCE(excluded.team, students.team),
    last_seen = excluded.last_seen
"""

INSERT_EVENT = """
INSERT INTO events (event_id, student_id, event_type, occurred_at, received_at, course_id,
    cell_index, source, status, duration_ms, extra)
VALUES (:event_id, :student_id, :event_type, :now, :now, :course_id,
    :cell_index, :source, :status, :duration_ms, CAST(:extra AS jsonb))
ON CONFLICT (event_id) DO NOTHING
RETURNING id
"""

database = Database(os.environ["DATABASE_URL"])
publisher = aioredis.from_url(os.environ["REDIS_URL"])


async def post_events(request: Request) -> Response:
    event = orjson.loads(await request.body())
    now = dt.datetime.now(dt.UTC)
    async with database.transaction():
        await database.execute(
            UPSERT_STUDENT,
            {
                "student_id": event["student_id"],
                "name": None,
                "course_id": event.get("course_id"),
                "team": None,
                "seen": now,
            },
        )
        new_id = await database.fetch_val(
            INSERT_EVENT,
            {
                "event_id": event["event_id"],
                "student_id": event["student_id"],
                "event_type": event["event_type"],
                "now": now,
                "course_id": event.get("course_id"),
                "cell_index": event.get("cell_index"),
                "source": event.get("source"),
                "status": event.get("status"),
                "duration_ms": event.get("duration_ms"),
                "extra": "{}",
            },
        )
    document = {**event, "id": new_id}
    await publisher.publish(CHANNEL, orjson.dumps([document]))
    return Response(orjson.dumps({"events": [{"id": new_id}]}), 201, media_type="application/json")


async def lifespan(app: Starlette):
    await database.connect()
    for statement in SCHEMA_PATH.read_text().split(";"):
        lines = [line for line in statement.splitlines() if not line.lstrip().startswith("--")]
        if "".join(lines).strip():
            await database.execute("\n".join(lines))
    yield
    await publisher.aclose()
    await database.disconnect()


app = Starlette(routes=[Route("/api/v1/events", post_events, methods=["POST"])], lifespan=lifespan)
