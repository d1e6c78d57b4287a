"""Running a class across two server processes on PostgreSQL and Redis, as deployed."""

import httpx
import pytest

from tests.e2e.clients import SseClient, post_events


@pytest.fixture
def two_dynos(production):
    return production(), production()


def queue(server) -> list[str]:
    response = httpx.get(f"{server.url}/api/v1/help", timeout=10)
    assert response.status_code == 200, response.text
    return [hand["student_id"] for hand in response.json()["queue"]]


async def test_a_dismissal_on_one_dyno_reaches_dashboards_on_the_other(two_dynos) -> None:
    web1, web2 = two_dynos
    dashboard = await SseClient(web2.url).start()
    hand = {"emailAddress": "ada@uni.edu", "eventType": "help", "notebookPath": "lab.ipynb"}
    receipts = await post_events(web1.url, hand, {**hand, "emailAddress": "bob@uni.edu"})
    assert queue(web2) == ["ada@uni.edu", "bob@uni.edu"]
    dismissed = httpx.post(
        f"{web1.url}/api/v1/help/ada@uni.edu/dismiss", json={"by": "Ms Lee"}, timeout=10
    )
    assert dismissed.status_code == 201, dismissed.text
    await dashboard.wait_for_ids([receipt["id"] for receipt in receipts] + [dismissed.json()["id"]])
    assert dashboard.documents[-1]["event_type"] == "help_dismissed"
    assert dashboard.documents[-1]["extra"] == {"by": "Ms Lee"}
    assert queue(web2) == ["bob@uni.edu"]
    await post_events(web2.url, hand)  # ada's extension beats on: her hand stays down
    assert queue(web1) == ["bob@uni.edu"]
    await dashboard.close()
