"""Schemathesis against the API's own OpenAPI document, on a real one-node cluster.

Every operation gets generated requests, valid and invalid by the schema, sent as admin (so they
reach the deepest code). Every answer must be documented (status, content type, body schema)
and none may be a 5xx. The suite runs a bounded, derandomized sample (CLUSTERCERT_FUZZ_EXAMPLES
per operation, 10 by default); ``make fuzz`` runs many more, randomized.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from clusterkit import api
from conftest import start_cluster
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from clustercert.control.app import build_app
from clustercert.demo import ADMIN_EMAIL, DemoCluster

EXAMPLES = int(os.environ.get("CLUSTERCERT_FUZZ_EXAMPLES", "10"))
RANDOMIZED = os.environ.get("CLUSTERCERT_FUZZ_RANDOM") == "1"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]

# What the run saw, per status code (checked by the last test).
STATUSES: collections.Counter[int] = collections.Counter()


@pytest.fixture(scope="module")
def fuzzed_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    cluster = start_cluster(tmp_path_factory, 1)
    yield cluster
    cluster.stop()


# The document the server serves, built without one (routes need their ControlPlane only when
# called); test_the_fuzz_run_was_real checks that the served one is the same.
DOCUMENT = build_app(None).openapi()  # type: ignore[arg-type]
schema = schemathesis.openapi.from_dict(DOCUMENT)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOMIZED,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_is_documented_and_none_is_a_server_error(
    case: Any, fuzzed_cluster: DemoCluster
) -> None:
    response = case.call(
        base_url=fuzzed_cluster.api_url,
        auth=(ADMIN_EMAIL, fuzzed_cluster.admin_password),
        verify=str(fuzzed_cluster.cluster.ca_file),
        timeout=60,
    )
    STATUSES[response.status_code] += 1
    case.validate_response(response, checks=CHECKS)


def test_the_fuzz_run_was_real(fuzzed_cluster: DemoCluster) -> None:
    """Runs after the fuzzing: enough cases, some accepted and some refused, no 5xx."""
    total = sum(STATUSES.values())
    print(f"fuzz: {total} requests, statuses {dict(sorted(STATUSES.items()))}")
    assert total >= 10 * EXAMPLES
    assert [s for s in STATUSES if s >= 500] == []
    assert STATUSES[200] > 0 and STATUSES[400] > 0
    with api(fuzzed_cluster, auth=None) as anonymous, api(fuzzed_cluster) as admin:
        assert anonymous.get("/openapi.json").status_code == 401
        served = admin.get("/openapi.json").json()
    assert served == DOCUMENT
    log = (fuzzed_cluster.directory / "logs" / "server.log").read_text()
    assert "Traceback" not in log
