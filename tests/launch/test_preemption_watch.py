"""The AWS spot watcher against a loopback server speaking the instance metadata protocol.

IMDSv2: ``PUT /latest/api/token`` (with a TTL header) returns a session token; every other
request must carry it in ``X-aws-ec2-metadata-token`` or gets 401. ``spot/instance-action`` is
404 until a stop is scheduled, then a JSON body. Servers that still allow IMDSv1 answer
without a token; servers that refuse the PUT (a hop limit, a proxy) leave only IMDSv1.
"""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from tests.e2e.helpers import wait_for
from tlaunch.preemption import Watcher, aws_notice

TOKEN = "AQAEAtoken=="


class _Imds(http.server.BaseHTTPRequestHandler):
    action: dict | None = None
    require_token = True
    token_endpoint = True
    seen_tokens: list

    def log_message(self, *args) -> None:
        pass

    def do_PUT(self) -> None:
        if self.path != "/latest/api/token" or not self.token_endpoint:
            self.send_error(403)
            return
        if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self.send_error(400, "missing TTL header")
            return
        self._reply(200, TOKEN)

    def do_GET(self) -> None:
        token = self.headers.get("X-aws-ec2-metadata-token")
        self.seen_tokens.append(token)
        if self.require_token and token != TOKEN:
            self.send_error(401)
            return
        if self.path != "/latest/meta-data/spot/instance-action" or self.action is None:
            self.send_error(404)
            return
        self._reply(200, json.dumps(self.action))

    def _reply(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def imds():
    handler = type("H", (_Imds,), {"seen_tokens": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}/latest"
    server.shutdown()
    server.server_close()


def test_no_notice_until_a_stop_is_scheduled(imds):
    handler, base = imds
    assert aws_notice(base) is None
    handler.action = {"action": "terminate", "time": "2026-11-22T10:00:00Z"}
    assert aws_notice(base) == "AWS spot instance-action terminate"
    assert handler.seen_tokens[-1] == TOKEN  # IMDSv2: the session token was sent


def test_imdsv1_only_server_still_answers(imds):
    handler, base = imds
    handler.token_endpoint, handler.require_token = False, False
    handler.action = {"action": "stop"}
    assert aws_notice(base) == "AWS spot instance-action stop"
    assert handler.seen_tokens[-1] is None


def test_watcher_triggers_once_from_the_environment(imds, monkeypatch):
    handler, base = imds
    monkeypatch.setenv("TLAUNCH_AWS_METADATA_URL", base)
    fired: list[str] = []
    done = threading.Event()

    def trigger(reason: str) -> None:
        fired.append(reason)
        done.set()

    watcher = Watcher("aws", trigger, poll=0.01).start()
    try:
        wait_for(lambda: len(handler.seen_tokens) >= 3, 10, "three polls of the metadata server")
        assert fired == []  # 404s: nothing fired
        handler.action = {"action": "hibernate"}
        assert done.wait(10)
    finally:
        watcher.close()
    watcher._thread.join(5)
    assert fired == ["AWS spot instance-action hibernate"]
    assert not watcher._thread.is_alive()  # it stops after one notice
