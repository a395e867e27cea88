"""Real dlib embeddings (74 images of 18 people): hold one image back per person, match it through the API."""

from __future__ import annotations

import numpy as np

from appliance.settings import DEFAULT_MODELS
from tests.conftest import FACES as DATA
from tests.vector.conftest import MODEL


def test_held_back_image_of_every_person_matches_at_rank_one(ready_client, new_subject, enrol, match_headers):
    data = np.load(DATA)
    vectors, people = data["vectors"].astype(np.float32), data["labels"]
    subject_of: dict[str, str] = {}
    probes: list[tuple[str, np.ndarray]] = []
    for person in sorted(set(people)):
        rows = vectors[people == person]
        if len(rows) < 2:
            continue
        subject_of[person] = new_subject(label=person)
        enrol(subject_of[person], rows[1:])
        probes.append((person, rows[0]))
    r = ready_client.post("/v1/match:batch", json={"model": MODEL, "k": 3,
                                                   "embeddings": [p[1].tolist() for p in probes]},
                          headers=match_headers)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    wrong = [person for (person, _), res in zip(probes, results, strict=True)
             if res["candidates"][0]["subject_id"] != subject_of[person]]
    assert not wrong, f"rank-1 misses: {wrong}"
    # The default threshold promises FAR <= 1 % per query on 1,570 LFW people (bench/thresholds.py), so it names
    # a held-back probe only when its similarity reaches it (14 of these 18); a request's own lower threshold,
    # the old default 0.94 (FAR 18.6 % on LFW), accepts every one.
    default = DEFAULT_MODELS[MODEL].threshold
    assert {res["threshold"] for res in results} == {default}
    assert [res["decision"] for res in results] == ["match" if res["similarity"] >= default else "unknown"
                                                    for res in results]
    assert sum(res["decision"] == "match" for res in results) > len(results) // 2
    r = ready_client.post("/v1/match:batch", json={"model": MODEL, "k": 1, "threshold": 0.94,
                                                   "embeddings": [p[1].tolist() for p in probes]},
                          headers=match_headers)
    assert all(res["decision"] == "match" for res in r.json()["results"])
