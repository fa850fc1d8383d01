"""Stop triggers the launcher watches besides signals: cloud preemption notices and a deadline.

GCE announces preemption and host maintenance through its metadata server
(``instance/preempted`` turns ``TRUE``; ``instance/maintenance-event`` turns
``TERMINATE_ON_HOST_MAINTENANCE``), AWS through ``spot/instance-action`` (404 until a stop is
scheduled, then a JSON body; IMDSv2 wants a session token first). Each watcher polls about once
a second in a daemon thread and calls ``trigger(reason)`` once.

``--preemption-watch auto`` decides from local facts only (the DMI product name the VM's
firmware reports, or an endpoint set in the environment), so it costs nothing off-cloud: no
connection is attempted on a laptop or in a notebook that is not on GCE or EC2.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from tlaunch.contract import AWS_URL_ENV, GCE_URL_ENV

GCE_DEFAULT = "http://metadata.google.internal/computeMetadata/v1"
AWS_DEFAULT = "http://169.254.169.254/latest"
POLL_SECONDS = 1.0
_DMI = "/sys/class/dmi/id/product_name"


def _dmi_product() -> str:
    try:
        with open(_DMI) as f:
            return f.read().strip()
    except OSError:
        return ""


def detect(mode: str) -> str | None:
    """Which watcher ``--preemption-watch MODE`` means on this machine: gce, aws or None."""
    if mode in ("gce", "aws"):
        return mode
    if mode == "off":
        return None
    if os.environ.get(GCE_URL_ENV):
        return "gce"
    if os.environ.get(AWS_URL_ENV):
        return "aws"
    product = _dmi_product()
    if product.startswith("Google Compute Engine"):
        return "gce"
    if (
        product.startswith(("Amazon EC2", "HVM domU"))
        or os.path.exists("/sys/hypervisor/uuid")
        and open("/sys/hypervisor/uuid").read(3) == "ec2"
    ):
        return "aws"
    return None


def _get(url: str, headers: dict[str, str], method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""


def gce_notice(base: str) -> str | None:
    """A reason to stop now, or None. Raises OSError when the server cannot be reached."""
    headers = {"Metadata-Flavor": "Google"}
    status, body = _get(f"{base}/instance/preempted", headers)
    if status == 200 and body.strip().upper() == "TRUE":
        return "GCE preemption notice"
    status, body = _get(f"{base}/instance/maintenance-event", headers)
    # MIGRATE_ON_HOST_MAINTENANCE is a live migration: the VM keeps running, nothing to do.
    if status == 200 and body.strip().upper().startswith("TERMINATE"):
        return f"GCE maintenance event {body.strip()}"
    return None


def aws_notice(base: str) -> str | None:
    headers: dict[str, str] = {}
    status, token = _get(
        f"{base}/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"}, method="PUT"
    )
    if status == 200 and token:
        headers["X-aws-ec2-metadata-token"] = token
    status, body = _get(f"{base}/meta-data/spot/instance-action", headers)
    if status != 200:
        return None
    try:
        action = json.loads(body).get("action", "stop")
    except ValueError:
        action = "stop"
    return f"AWS spot instance-action {action}"


class Watcher:
    """Polls a cloud notice and calls ``trigger(reason)`` the first time one appears."""

    def __init__(
        self, kind: str, trigger: Callable[[str], None], poll: float = POLL_SECONDS
    ) -> None:
        self.kind, self.trigger, self.poll = kind, trigger, poll
        self.base = os.environ.get(GCE_URL_ENV if kind == "gce" else AWS_URL_ENV) or (
            GCE_DEFAULT if kind == "gce" else AWS_DEFAULT
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"tlaunch-{kind}-watch", daemon=True
        )

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        check = gce_notice if self.kind == "gce" else aws_notice
        while not self._stop.is_set():
            try:
                reason = check(self.base)
            except OSError:
                reason = None  # the metadata server blinked; the next poll will tell
            if reason:
                self.trigger(reason)
                return
            self._stop.wait(self.poll)


class Deadline:
    """Backstop for --time-limit: the Run API stops by itself earlier, with a margin measured
    from its own saves; this fires a few seconds before the limit for scripts that do not use
    it (so --sync-dir still gets its final flush)."""

    def __init__(
        self, seconds: float, trigger: Callable[[str], None], started: float | None = None
    ) -> None:
        # Later than the Run's own margin (at least 5% of the limit), so it only ever decides
        # for scripts that do not use the Run API.
        self.fire_at = (started or time.time()) + seconds - min(5.0, 0.02 * seconds)
        self._timer = threading.Timer(
            max(0.0, self.fire_at - time.time()), trigger, args=("--time-limit reached",)
        )
        self._timer.daemon = True

    def start(self) -> Deadline:
        self._timer.start()
        return self

    def close(self) -> None:
        self._timer.cancel()
