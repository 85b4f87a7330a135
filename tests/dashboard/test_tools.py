"""The node's ``/metrics`` and ``/openapi.json`` as other tools read them, and a bounded
schemathesis fuzz of the HTTP API against its own description, on one real node.

- ``promtool check metrics`` (Debian package ``prometheus``) accepts ``/metrics``;
  ``prometheus_client.parser`` reads it back;
- ``openapi-spec-validator`` accepts ``/openapi.json``;
- schemathesis draws requests for every operation of the description (``FUZZ_EXAMPLES``,
  derandomized, so CI sees the same ones) and sends them signed with the mesh key, as a
  client would: every answer is a status the description documents, never a 500, and the
  node still answers afterwards with no internal error counted. The streams (the client
  websocket and the two event feeds) are left out, and long polls are asked to wait 0 s: a
  fuzz run is bounded to well under a minute.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from mesh.client.local import LocalMesh
from mesh.runtime.auth import key_bytes, sign_request
from tests.dashboard.conftest import need

FUZZ_EXAMPLES = 120
STREAMS = {"/v1/session", "/v1/mesh/feed", "/dashboard/feed"}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    directory = tmp_path_factory.mktemp("tools")
    with LocalMesh(
        1,
        preset="test",
        key=secrets.token_hex(16),
        slots=1,
        env={"XDG_CONFIG_HOME": str(directory / "config")},
        workdir=directory,
    ) as mesh:
        with mesh.client() as c:  # counters with values, and a stored result
            c.gather(c.map("echo", range(3)))
            with pytest.raises(Exception, match="boom"):
                c.submit("fail", "boom").result(timeout=30)
        yield mesh


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        text: str = resp.read().decode()
    return text


def test_metrics_pass_promtool(node: LocalMesh) -> None:
    promtool = shutil.which("promtool")
    need(promtool is not None, "promtool (apt-get install prometheus)")
    assert promtool is not None
    text = _get(node.nodes["node-1"].url + "/metrics")
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert not out.stdout.strip(), f"promtool lint findings:\n{out.stdout}"


def test_metrics_parse_with_prometheus_client(node: LocalMesh) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    text = _get(node.nodes["node-1"].url + "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"mesh_peers", "mesh_tasks", "mesh_executed", "mesh_running_tasks"} <= set(families)
    executed = {s.labels.get("outcome"): s.value for s in families["mesh_executed"].samples}
    assert executed.get("ok") == 3.0
    assert executed.get("error") == 1.0


def test_openapi_passes_the_validator(node: LocalMesh) -> None:
    from openapi_spec_validator import validate

    spec = json.loads(_get(node.nodes["node-1"].url + "/openapi.json"))
    validate(spec)
    assert "/dashboard/feed" in spec["paths"]
    assert "/v1/events" in spec["paths"]


def test_schemathesis_fuzz_against_the_spec(node: LocalMesh) -> None:
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error, status_code_conformance

    base = node.nodes["node-1"].url
    key = key_bytes(node.key)
    to = json.loads(_get(base + "/v1/hello"))["id"]
    spec = json.loads(_get(base + "/openapi.json"))
    schema = schemathesis.openapi.from_dict(spec)
    operations = [op.ok() for op in schema.get_all_operations() if op.ok().path not in STREAMS]
    assert len(operations) >= 12
    http = requests.Session()
    statuses: dict[int, int] = {}
    started = time.monotonic()

    def send(case: Any) -> None:
        if case.query and "wait" in case.query:
            case.query["wait"] = 0
        if isinstance(case.body, dict) and "wait" in case.body:
            case.body["wait"] = 0
        kwargs = case.as_transport_kwargs(base_url=base)
        request = requests.Request(
            method=kwargs["method"],
            url=kwargs["url"],
            headers=kwargs.get("headers"),
            params=kwargs.get("params"),
            json=kwargs.get("json"),
            data=kwargs.get("data"),
            cookies=kwargs.get("cookies"),
        ).prepare()
        body = request.body or b""
        body = body.encode() if isinstance(body, str) else body
        request.headers.update(
            sign_request(key, request.method or "GET", request.path_url, body, time.time(), to=to)
        )
        response = http.send(request, timeout=30, allow_redirects=False)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance])

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        operation = data.draw(st.sampled_from(operations))
        send(data.draw(operation.as_strategy()))

    fuzz()
    assert time.monotonic() - started < 60, "the fuzz run must stay bounded"
    assert json.loads(_get(base + "/v1/hello"))["id"] == to, "the node must stay up"
    metrics = _get(base + "/metrics")
    assert 'reason="http-internal-error"} 0.0' in metrics or "http-internal-error" not in metrics
    assert 200 in statuses, statuses
    assert 401 in statuses, statuses
