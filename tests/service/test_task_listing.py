"""`GET /tasks` at scale: pages by name with a total and a link to the next page; each task says whether
it is resident here and whether its weights are materialized. Through a real server on a real store."""

from __future__ import annotations

from mask_store import TaskStore, artifact_bytes
from tests.support.builders import random_task_artifact, server_settings
from tests.support.servers import png_bytes, serve_in_process


def test_tasks_page_by_name_with_a_total_and_a_next_link(tmp_path, backbone_file, resnet18):
    store = TaskStore(tmp_path / "store")
    names = ["e", "a", "d", "b", "c"]
    for seed, name in enumerate(names):
        store.put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task=name, seed=seed)))
    with serve_in_process(server_settings(backbone_file, tmp_path / "store")) as http:
        listed, url = [], "/tasks?limit=2"
        while url:
            page = http.get(url)
            assert page.status_code == 200 and page.headers["X-Total-Count"] == "5"
            assert len(page.json()) <= 2
            listed += [task["name"] for task in page.json()]
            url = page.links["next"]["url"] if "next" in page.links else None
        assert listed == sorted(names)
        assert [t["name"] for t in http.get("/tasks", params={"after": "c"}).json()] == ["d", "e"]
        assert len(http.get("/tasks").json()) == 5  # one page holds up to 1,000
        assert http.get("/tasks", params={"limit": 0}).status_code == 422

        described = http.get("/tasks/c").json()
        assert described["resident"] is True and described["weights_cached"] is False
        files = [("images", ("a.png", png_bytes(1), "image/png"))]
        assert http.post("/tasks/c/predict", files=files).status_code == 200
        assert http.get("/tasks/c").json()["weights_cached"] is True
