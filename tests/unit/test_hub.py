import asyncio

import orjson
import pytest

from telemetry.bus import decode_message, encode_batch, encode_erasure
from telemetry.hub import (
    OVERFLOWED,
    Frame,
    Hub,
    StreamFilter,
    finish_if_cancelled,
    run_until_waiting,
)
from telemetry.storage import StoredBatch, StoredEvent


def document(event_id: int, **fields) -> dict:
    return {"id": event_id, "student_id": "s1", "course_id": "c1", "event_type": "x", **fields}


def queued_ids(client) -> list[int]:
    return [frame.id for frame in client.frames]


def test_frame_is_encoded_once_for_both_transports() -> None:
    frame = Frame.of(document(7, source="a\nb"))
    assert frame.sse == b"id: 7\ndata: " + orjson.dumps(document(7, source="a\nb")) + b"\n\n"
    assert orjson.loads(frame.ws) == document(7, source="a\nb")
    assert frame.sse.count(b"\n") == 3  # newlines inside values are escaped


def test_hub_delivers_each_id_once_in_order() -> None:
    hub = Hub(queue_limit=10)
    with hub.subscribe(StreamFilter()) as client:
        hub.deliver([document(1), document(2)])
        hub.deliver([document(2), document(1), document(3)])
        assert queued_ids(client) == [1, 2, 3]
    assert hub.clients == set()


def test_filters_apply_before_queueing() -> None:
    hub = Hub(queue_limit=10)
    with (
        hub.subscribe(StreamFilter(student_id="s2")) as by_student,
        hub.subscribe(StreamFilter(course_id="c1", event_type="help")) as by_course,
    ):
        hub.deliver([document(1), document(2, student_id="s2"), document(3, event_type="help")])
        assert queued_ids(by_student) == [2]
        assert queued_ids(by_course) == [3]


async def test_slow_client_overflows_without_touching_others() -> None:
    hub = Hub(queue_limit=2)
    with hub.subscribe(StreamFilter()) as slow, hub.subscribe(StreamFilter()) as fast:
        hub.deliver([document(1), document(2)])
        assert [f.id for f in await fast.next_frames()] == [1, 2]
        hub.deliver([document(3)])
        assert slow.ended == OVERFLOWED and not slow.frames
        assert [f.id for f in await fast.next_frames()] == [3]
        assert await slow.next_frames() == []


async def test_next_frames_waits_for_an_event_and_returns_all_queued() -> None:
    hub = Hub(queue_limit=10)
    with hub.subscribe(StreamFilter()) as client:
        waiting = asyncio.create_task(client.next_frames())
        await asyncio.sleep(0)
        assert not waiting.done()
        hub.deliver([document(1), document(2)])
        assert [f.id for f in await waiting] == [1, 2]


async def test_closing_ends_the_client() -> None:
    hub = Hub(queue_limit=10)
    with hub.subscribe(StreamFilter()) as client:
        waiting = asyncio.create_task(client.next_frames())
        await asyncio.sleep(0)
        hub.close_all()
        assert await waiting == []


@pytest.mark.parametrize(
    "payload",
    [b"{not json", b"[]", b'{"events": []}', b'{"follows": "x", "events": []}', b'{"erased": 5}'],
)
def test_malformed_bus_messages_are_ignored(payload: bytes) -> None:
    assert decode_message(payload) is None


def test_a_bus_message_round_trips() -> None:
    stored = StoredBatch([StoredEvent(document(5), False)], follows=4)
    assert decode_message(encode_batch(stored)) == {"follows": 4, "events": [document(5)]}


def test_duplicates_are_not_published() -> None:
    stored = [StoredEvent(document(1), False), StoredEvent({"id": 1, "event_id": "e"}, True)]
    assert orjson.loads(encode_batch(StoredBatch(stored, 0)))["events"] == [document(1)]
    assert encode_batch(StoredBatch(stored[1:], 0)) is None


def test_a_scoped_client_gets_its_courses_only_never_events_without_one() -> None:
    hub = Hub(queue_limit=10)
    with (
        hub.subscribe(StreamFilter(courses=frozenset({"c1", "c2"}))) as scoped,
        hub.subscribe(StreamFilter(course_id="c2", courses=frozenset({"c1", "c2"}))) as narrowed,
        hub.subscribe(StreamFilter()) as unscoped,
    ):
        hub.deliver(
            [document(1), document(2, course_id="c2"), document(3, course_id="c3"),
             document(4, course_id=None), document(5)]
        )  # fmt: skip
        assert queued_ids(scoped) == [1, 2, 5]
        assert queued_ids(narrowed) == [2]
        assert queued_ids(unscoped) == [1, 2, 3, 4, 5]


def test_an_erasure_reaches_the_clients_of_its_course_in_its_place() -> None:
    hub = Hub(queue_limit=10)
    with (
        hub.subscribe(StreamFilter(courses=frozenset({"c1"}))) as same,
        hub.subscribe(StreamFilter(courses=frozenset({"c2"}))) as other,
        hub.subscribe(StreamFilter(student_id="s9")) as unscoped,
    ):
        hub.deliver([document(1)])
        hub.announce_erasure({"student_id": "s1", "course_id": "c1"})
        hub.deliver([document(2, student_id="s2")])
        assert [(frame.id, frame.notice) for frame in same.frames] == [
            (1, False),
            (1, True),
            (2, False),
        ]
        assert not other.frames
        [notice] = unscoped.frames
        expected = {"type": "erased", "student_id": "s1", "course_id": "c1"}
        assert notice.sse == b"event: erased\ndata: " + orjson.dumps(expected) + b"\n\n"
        assert orjson.loads(notice.ws) == expected


def test_a_course_erasure_reaches_every_client_of_that_course() -> None:
    hub = Hub(queue_limit=10)
    with (
        hub.subscribe(StreamFilter(courses=frozenset({"c1", "c2"}))) as both,
        hub.subscribe(StreamFilter(courses=frozenset({"c1"}))) as first,
    ):
        hub.announce_erasure({"student_id": None, "course_id": "c2"})
        assert len(both.frames) == 1 and not first.frames


def test_an_erasure_round_trips_on_the_bus_and_is_no_batch() -> None:
    payload = encode_erasure({"student_id": "s1", "course_id": None})
    assert decode_message(payload) == {"erased": {"student_id": "s1", "course_id": None}}
    stored = StoredBatch([StoredEvent(document(5), False)], follows=4)
    assert "erased" not in decode_message(encode_batch(stored))


async def test_a_coroutine_that_does_not_wait_runs_to_its_end_at_once() -> None:
    ran = []

    async def write() -> None:
        ran.append(1)

    assert run_until_waiting(write()) is None and ran == [1]


async def test_a_coroutine_that_waits_is_finished_by_whoever_awaits_the_rest() -> None:
    ready = asyncio.get_running_loop().create_future()
    steps = []

    async def write() -> str:
        steps.append("before")
        steps.append(await ready)
        return "done"

    rest = run_until_waiting(write())
    assert rest is not None and steps == ["before"]
    finishing = asyncio.create_task(_await(rest))
    await asyncio.sleep(0)
    ready.set_result("after")
    assert await finishing == "done" and steps == ["before", "after"]


async def test_cancelling_the_rest_cancels_the_coroutine_where_it_waits() -> None:
    never = asyncio.get_running_loop().create_future()
    cleaned = []

    async def write() -> None:
        try:
            await never
        finally:
            cleaned.append(True)

    finishing = asyncio.create_task(_await(run_until_waiting(write())))
    await asyncio.sleep(0)
    finishing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await finishing
    assert cleaned == [True] and never.cancelled()


async def _await(awaitable):
    return await awaitable


async def test_a_gap_check_cancelled_mid_query_finishes_the_query_before_it_ends() -> None:
    query_may_end, finished = asyncio.Event(), []

    async def query() -> int:
        await query_may_end.wait()
        finished.append(True)
        return 1

    check = asyncio.create_task(finish_if_cancelled(query()))
    await asyncio.sleep(0)  # the query is under way
    check.cancel()
    await asyncio.sleep(0)
    assert not check.done()  # still waiting for the query, not cut off
    query_may_end.set()
    with pytest.raises(asyncio.CancelledError):
        await check
    assert finished == [True]
