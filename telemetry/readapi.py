"""The read API: events, students, help queue and hand actions, cells, activity, CSV export,
and the service's metrics. Every endpoint goes through authorize_read and reads only its
Grant's courses, but the metrics: they name no student or course and count every course, so
they take a token of every course, outside the access log."""

from __future__ import annotations

import csv
import datetime as dt
import functools
import io
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from telemetry import cellview, classview, helpstats, metrics, studentview
from telemetry.access import authorize_read, dashboard_grant
from telemetry.classview import hand_document, latest_hand
from telemetry.errors import ApiError, FieldErrors, StorageUnavailable, storage_unavailable
from telemetry.events import (
    EARLIEST_OCCURRED_AT,
    IDENTIFIER_MAX_CHARS,
    INT64_MAX,
    TEXT_MAX_CHARS,
    error_text,
    parse_instructor,
    read_body,
)
from telemetry.ingest import normalise_batch
from telemetry.service import service_of
from telemetry.storage import (
    format_timestamp,
    read_storage,
)

logger = logging.getLogger(__name__)

# Pages are keysets, never OFFSET: a page stays correct while events keep arriving.
PAGE_LIMIT_DEFAULT = 100
PAGE_LIMIT_MAX = 1_000
EXPORT_PAGE_SIZE = 1_000
STREAM_FILTERS = ("student_id", "course_id", "event_type")

# Reads one query parameter, adding to `errors` what is wrong with it.
QueryReader = Callable[[Mapping[str, str], str, FieldErrors], Any]


def text_param(max_chars: int, absent: str | None = None) -> QueryReader:
    def read(query: Mapping[str, str], name: str, errors: FieldErrors) -> str | None:
        value = query.get(name) or absent  # empty means absent, as an HTML form sends it
        if value is not None and len(value) > max_chars:
            errors.add(name, f"must be at most {max_chars} characters")
            return absent
        return value

    return read


def int_param(default: int, low: int, high: int) -> QueryReader:
    def read(query: Mapping[str, str], name: str, errors: FieldErrors) -> int:
        raw = query.get(name, "").strip()
        if not raw:
            return default
        if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
            errors.add(name, f"must be a whole number from {low} to {high}")
            return default
        return int(raw)

    return read


def bool_param(query: Mapping[str, str], name: str, errors: FieldErrors) -> bool:
    raw = query.get(name, "").strip().lower()
    if raw not in ("", "true", "false"):
        errors.add(name, "must be true or false")
    return raw == "true"


def required(read: QueryReader) -> QueryReader:
    def read_required(query: Mapping[str, str], name: str, errors: FieldErrors) -> Any:
        if not query.get(name):
            errors.add(name, "is required")
        return read(query, name, errors)

    return read_required


def zone_param(query: Mapping[str, str], name: str, errors: FieldErrors) -> ZoneInfo:
    raw = query.get(name) or "UTC"
    try:
        return ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        errors.add(name, "must be an IANA time zone, such as Asia/Tokyo")
        return ZoneInfo("UTC")


def time_param(query: Mapping[str, str], name: str, errors: FieldErrors) -> dt.datetime:
    raw = query.get(name, "").strip()
    try:
        moment = dt.datetime.fromisoformat(raw) if raw else EARLIEST_OCCURRED_AT
        moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
        return max(moment.astimezone(dt.UTC), EARLIEST_OCCURRED_AT)
    except (ValueError, OverflowError):
        errors.add(name, "must be an ISO 8601 time, such as 2026-12-03T00:00:00+09:00")
        return EARLIEST_OCCURRED_AT


def free_text(query: Mapping[str, str], name: str, errors: FieldErrors) -> str | None:
    return query.get(name) or None


def query_parser(**readers: QueryReader) -> Callable[[Mapping[str, str]], dict[str, Any]]:
    """An endpoint's query parameters, or a 422 naming every bad value and every unknown
    name: a misspelt filter (`?course=cs101`) must not quietly answer with everyone."""

    def parse(query: Mapping[str, str]) -> dict[str, Any]:
        errors = FieldErrors()
        params = {name: read(query, name, errors) for name, read in readers.items()}
        for name in query:
            if name not in readers and name != "token":
                errors.add(name, "is not a parameter of this endpoint")
        if errors.details:
            message = "some query parameters are invalid"
            raise ApiError(422, "invalid_query", message, errors.details)
        return params

    return parse


TEXT = text_param(TEXT_MAX_CHARS)
IDENTIFIER = text_param(IDENTIFIER_MAX_CHARS)
PAGE_LIMIT = int_param(PAGE_LIMIT_DEFAULT, 1, PAGE_LIMIT_MAX)
EVENT_FILTERS = dict(
    student_id=IDENTIFIER, course_id=TEXT, team=TEXT, event_type=IDENTIFIER, notebook_path=TEXT
)

parse_events_query = query_parser(
    **EVENT_FILTERS,
    since_id=int_param(0, 0, INT64_MAX),
    before_id=int_param(INT64_MAX, 1, INT64_MAX),
    limit=PAGE_LIMIT,
    collapse_beats=bool_param,
)
parse_students_query = query_parser(
    course_id=TEXT, team=TEXT, after=text_param(IDENTIFIER_MAX_CHARS, absent=""), limit=PAGE_LIMIT
)
parse_course_query = query_parser(course_id=TEXT)
parse_cells_query = query_parser(
    course_id=TEXT, team=TEXT, notebook_path=TEXT, limit=int_param(200, 1, PAGE_LIMIT_MAX)
)
parse_activity_query = query_parser(course_id=TEXT, team=TEXT, minutes=int_param(60, 1, 1_440))
parse_progress_query = query_parser(course_id=TEXT, team=TEXT, notebook_path=TEXT)
# A cell outside any notebook has notebook_path '' in cell_runs: absent means that one.
parse_cell_detail_query = query_parser(
    course_id=TEXT,
    team=TEXT,
    notebook_path=text_param(TEXT_MAX_CHARS, absent=""),
    cell_key=required(TEXT),
)
parse_export_query = query_parser(**EVENT_FILTERS, tz=zone_param)
parse_students_export_query = query_parser(course_id=TEXT, team=TEXT, tz=zone_param)
parse_help_stats_query = query_parser(
    since=time_param,
    course_id=TEXT,
    team=TEXT,
    limit=int_param(PAGE_LIMIT_DEFAULT, 0, PAGE_LIMIT_MAX),
    before_id=int_param(INT64_MAX, 1, INT64_MAX),
)
parse_help_export_query = query_parser(since=time_param, course_id=TEXT, team=TEXT, tz=zone_param)
# The streams' filters are free text: only a misspelt name can be refused.
parse_stream_query = query_parser(
    **dict.fromkeys(STREAM_FILTERS, free_text), last_event_id=free_text
)


async def read_page(
    read: Callable[[dict[str, Any]], Awaitable[list[dict]]], params: dict[str, Any], key: str
) -> tuple[list[dict], Any]:
    # One row more than the page tells whether another follows.
    limit = params["limit"]
    rows = await read_storage(read({**params, "limit": limit + 1}))
    page = rows[:limit]
    return page, page[-1][key] if len(rows) > limit else None


async def list_events(request: Request) -> Response:
    """Stored events, newest first, filtered; `next_before_id` fetches the older page."""
    storage = service_of(request).storage
    _, params = await authorize_read(request, parse_events_query)
    # Read before the page: resuming the stream from latest_id then misses nothing.
    latest_id = await read_storage(storage.max_event_id())
    page, next_before_id = await read_page(storage.events_page, params, "id")
    latest_id = max([latest_id, *(document["id"] for document in page)])
    return JSONResponse({"events": page, "next_before_id": next_before_id, "latest_id": latest_id})


async def list_students(request: Request) -> Response:
    """Students by student_id with their counts; `next_after` fetches the next page."""
    storage = service_of(request).storage
    _, params = await authorize_read(request, parse_students_query)
    now = dt.datetime.now(dt.UTC)
    stalled = service_of(request).settings.stalled_minutes
    read = functools.partial(studentview.students_page, storage, now=now, stalled_minutes=stalled)
    page, next_after = await read_page(read, params, "student_id")
    return JSONResponse({"now": format_timestamp(now), "students": page, "next_after": next_after})


async def list_help(request: Request) -> Response:
    """The help queue, first come first served, and every raise still beating."""
    _, params = await authorize_read(request, parse_course_query)
    now = dt.datetime.now(dt.UTC)
    hands = await read_storage(classview.hands(service_of(request).storage, params, now))
    queue = [hand for hand in hands if hand["state"] == "up"]
    return JSONResponse({"now": format_timestamp(now), "queue": queue, "hands": hands})


HAND_ACTIONS = {"on-my-way": "help_on_my_way", "dismiss": "help_dismissed"}


async def answer_hand(request: Request) -> Response:
    """Record "on my way" or a dismissal as an event, so every dashboard and reload agrees."""
    service = service_of(request)
    event_type = HAND_ACTIONS.get(request.path_params["action"])
    if event_type is None:
        raise ApiError(404, "not_found", "the actions are on-my-way and dismiss")
    student_id = request.path_params["student_id"]
    await authorize_read(request, lambda query: {"student_id": student_id})
    by = parse_instructor(await read_body(request, 4_096), request.headers.get("content-type"))
    seen, course_id = await read_storage(service.storage.student_course(student_id))
    if not seen:
        raise ApiError(404, "no_such_student", f"no student {student_id!r} has been seen")
    now = dt.datetime.now(dt.UTC)
    hand = hand_document(await read_storage(latest_hand(service.storage, student_id)), now)
    if hand is None or hand["state"] != "up":
        raise ApiError(409, "no_raised_hand", f"{student_id!r} has no raised hand now")
    raw = {"student_id": student_id, "event_type": event_type, "course_id": course_id, "by": by}
    [event] = normalise_batch(raw, now, service.settings)
    try:
        [stored] = await service.committer.submit([event])
    except StorageUnavailable:
        raise storage_unavailable("the action could not be stored") from None
    hand = hand_document(await read_storage(latest_hand(service.storage, student_id)), now)
    body = {"id": stored.document["id"], "event_type": event_type, "hand": hand}
    return JSONResponse(body, status_code=201)


async def show_help_stats(request: Request) -> Response:
    """What help took since `since`: per helper and per student over every raise, and the
    raises newest first, `limit` of them; `next_before_id` fetches the older page."""
    storage = service_of(request).storage
    _, params = await authorize_read(request, parse_help_stats_query)
    now = dt.datetime.now(dt.UTC)
    figures = await read_storage(helpstats.help_stats(storage, params, now))
    raises, next_before_id = [], None
    if params["limit"]:  # 0: the figures alone, as the queue's median wait asks
        read = functools.partial(helpstats.newest_raises, storage, now=now)
        raises, next_before_id = await read_page(read, params, "raise_id")
    page = {"raises": raises, "next_before_id": next_before_id}
    return JSONResponse({"now": format_timestamp(now), "since": format_timestamp(params["since"]),
                         **figures, **page})  # fmt: skip


async def list_cells(request: Request) -> Response:
    """Where the class is stuck: per notebook and cell, who ran it and who fails there now."""
    _, params = await authorize_read(request, parse_cells_query)
    cells = await read_storage(cellview.cells(service_of(request).storage, params))
    return JSONResponse({"now": format_timestamp(dt.datetime.now(dt.UTC)), "cells": cells})


async def list_activity(request: Request) -> Response:
    """Executions, errors and raised hands per minute over the last `minutes`."""
    _, params = await authorize_read(request, parse_activity_query)
    now = dt.datetime.now(dt.UTC)
    series = await read_storage(classview.activity(service_of(request).storage, params, now))
    body = {"now": format_timestamp(now), "minutes": params["minutes"], "series": series}
    return JSONResponse(body)


async def show_progress(request: Request) -> Response:
    """Students × cells of one notebook, each square the student's latest status there."""
    _, params = await authorize_read(request, parse_progress_query)
    grid = await read_storage(cellview.progress(service_of(request).storage, params))
    return JSONResponse({"now": format_timestamp(dt.datetime.now(dt.UTC)), **grid})


async def show_cell_detail(request: Request) -> Response:
    """One cell, every student: their latest code and error there, grouped by error."""
    _, params = await authorize_read(request, parse_cell_detail_query)
    cell = await read_storage(cellview.cell_detail(service_of(request).storage, params))
    return JSONResponse({"now": format_timestamp(dt.datetime.now(dt.UTC)), **cell})


parse_no_query = query_parser()


async def show_metrics(request: Request) -> Response:
    """The service's figures in Prometheus' format (telemetry.metrics); 403 for a token scoped
    to courses, since they count every course."""
    grant = await dashboard_grant(request)
    parse_no_query(request.query_params)
    if grant.courses is not None:
        message = f"token {grant.name!r} may not read the metrics"
        problem = "the metrics count every course: they need a token of every course"
        raise ApiError(403, "out_of_scope", message, [{"field": "token", "problem": problem}])
    body, content_type = metrics.exposition(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})


# A spreadsheet runs a cell that starts with one of these as a formula; students wrote it.
CSV_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# Spreadsheets read a CSV as the machine's legacy encoding unless it starts with a BOM.
UTF8_BOM = b"\xef\xbb\xbf"
# A `<name>_local` column is `<name>` in the time zone of the `tz` parameter.
STUDENT_CSV_COLUMNS = (
    "student_id name course_id team first_seen last_seen last_seen_local event_count "
    "execution_count error_count last_notebook_path hand_raised stuck struggling stalled status"
).split()
EVENT_CSV_COLUMNS = (
    "id received_at received_at_local occurred_at student_id student_name team course_id "
    "event_type notebook_path cell_id cell_index execution_count status duration_ms error "
    "source source_truncated"
).split()
HELP_CSV_COLUMNS = [*helpstats.RAISE_COLUMNS]
HELP_CSV_COLUMNS.insert(HELP_CSV_COLUMNS.index("raised_at") + 1, "raised_at_local")


def csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.startswith(CSV_FORMULA_PREFIXES):
        return "'" + value
    return value


def csv_line(values: Iterable[Any]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerow([csv_value(value) for value in values])
    return buffer.getvalue().encode()


def local_time(value: str | None, zone: ZoneInfo) -> str | None:
    # Without an offset: spreadsheets read "2026-12-03 18:04:05" as a date and time.
    return value and classview.as_datetime(value).astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")


def csv_cells(document: Mapping[str, Any], columns: list[str], zone: ZoneInfo) -> list[Any]:
    return [
        local_time(document.get(column.removesuffix("_local")), zone)
        if column.endswith("_local") else document.get(column)
        for column in columns
    ]  # fmt: skip


def event_csv_row(document: Mapping[str, Any], zone: ZoneInfo = dt.UTC) -> list[Any]:
    row = {**document, "error": error_text(document.get("error"))}  # `ename: evalue`
    return csv_cells(row, EVENT_CSV_COLUMNS, zone)


def csv_filename(params: Mapping[str, Any], kind: str, now: dt.datetime) -> str:
    """`cs101-events-2026-12-03.csv`: the course (all-courses if none) and the local date."""
    course = params.get("course_id") or "all-courses"
    return f"{course}-{kind}-{now.astimezone(params['tz']):%Y-%m-%d}.csv"


def attachment(filename: str) -> str:
    # RFC 6266: an ASCII name for old clients, the UTF-8 one (filename*) for the others.
    fallback = re.sub(r"[^A-Za-z0-9._-]+", "_", filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{urllib.parse.quote(filename)}"


async def csv_download(
    name: str,
    header: list[str],
    read_after: Callable[[dict | None], Awaitable[list[dict]]],
    row: Callable[[dict], list[Any]],
) -> Response:
    # One page in memory at a time; the first is read before answering, so a failure is a 503.
    first = await read_storage(read_after(None))

    async def lines() -> AsyncIterator[bytes]:
        yield UTF8_BOM + csv_line(header)
        page = first
        while page:
            yield b"".join(csv_line(row(item)) for item in page)
            try:
                page = await read_after(page[-1])
            except Exception as error:  # the status is sent: end the download short
                logger.warning("CSV export cut short: %r", error)
                return

    headers = {"Content-Disposition": attachment(name)}
    return StreamingResponse(lines(), media_type="text/csv; charset=utf-8", headers=headers)


async def export_events(request: Request) -> Response:
    """Events as CSV, oldest first, in keyset pages: a term fits, memory does not grow."""
    storage = service_of(request).storage
    _, params = await authorize_read(request, parse_export_query)
    params["limit"] = EXPORT_PAGE_SIZE

    def read_after(last: dict | None) -> Awaitable[list[dict]]:
        return storage.events_export({**params, "since_id": last["id"] if last else 0})

    name = csv_filename(params, "events", dt.datetime.now(dt.UTC))
    row = functools.partial(event_csv_row, zone=params["tz"])
    return await csv_download(name, EVENT_CSV_COLUMNS, read_after, row)


async def export_students(request: Request) -> Response:
    """The students table as CSV, in keyset pages."""
    service = service_of(request)
    _, params = await authorize_read(request, parse_students_export_query)
    params["limit"] = EXPORT_PAGE_SIZE
    now = dt.datetime.now(dt.UTC)

    def read_after(last: dict | None) -> Awaitable[list[dict]]:
        after = last["student_id"] if last else ""
        page = {**params, "after": after}
        return studentview.students_page(
            service.storage, page, now, service.settings.stalled_minutes
        )

    row = functools.partial(csv_cells, columns=STUDENT_CSV_COLUMNS, zone=params["tz"])
    name = csv_filename(params, "students", now)
    return await csv_download(name, STUDENT_CSV_COLUMNS, read_after, row)


async def export_help_stats(request: Request) -> Response:
    """Help's per-raise rows (see show_help_stats) as CSV, in keyset pages."""
    storage = service_of(request).storage
    _, params = await authorize_read(request, parse_help_export_query)
    now = dt.datetime.now(dt.UTC)

    def read_after(last: dict | None) -> Awaitable[list[dict]]:
        return helpstats.raises_page(storage, params, last["raise_id"] if last else 0, now)

    row = functools.partial(csv_cells, columns=HELP_CSV_COLUMNS, zone=params["tz"])
    return await csv_download(csv_filename(params, "help", now), HELP_CSV_COLUMNS, read_after, row)
