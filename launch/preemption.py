"""Stop triggers the launcher watches besides signals: cloud preemption notices and a deadline.

The deadline is ``--time-limit``: counted from the launch (``11h30m``) or from the runtime's
start (``runtime+11h30m``). The runtime's start is the machine's boot time: a Colab runtime is a
virtual machine of its own, booted when it was assigned, and its 12 h run from then; restarting
the kernel or reconnecting keeps the machine, and its clock. ``TLAUNCH_RUNTIME_START`` (epoch
seconds) replaces the boot time where that is not the runtime's start, and in tests.

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
import math
import os
import threading
import time
from collections.abc import Callable

from tlaunch.config import UsageError, parse_time_limit
from tlaunch.contract import AWS_URL_ENV, GCE_URL_ENV, RUNTIME_START_ENV

GCE_DEFAULT = "http://metadata.google.internal/computeMetadata/v1"
AWS_DEFAULT = "http://169.254.169.254/latest"
POLL_SECONDS = 1.0
_DMI = "/sys/class/dmi/id/product_name"
#: Where the boot time is read (its ``btime`` line); tests point it at a fixture file.
BOOT_TIME_FILE = "/proc/stat"


def runtime_start() -> float:
    """When this runtime started, in epoch seconds: ``TLAUNCH_RUNTIME_START`` when set, else
    the machine's boot time (``btime`` in ``/proc/stat``). UsageError when neither is known."""
    raw = os.environ.get(RUNTIME_START_ENV)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise UsageError(
                f"{RUNTIME_START_ENV}={raw!r} is not a time; give the runtime's start in epoch "
                "seconds, e.g. the output of `date +%s`"
            )
        return value
    try:
        with open(BOOT_TIME_FILE) as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    raise UsageError(
        f"--time-limit runtime+...: this machine does not say when it started ({BOOT_TIME_FILE} "
        f"has no boot time); set {RUNTIME_START_ENV} to the runtime's start in epoch seconds, "
        "or give a plain limit such as --time-limit 11h30m"
    )


def time_limit_span(time_limit: str | None, started: float) -> float | None:
    """Seconds from ``started`` (a launch's start, epoch seconds) to the ``--time-limit``
    deadline; negative when a ``runtime+`` deadline passed before the launch; None without one."""
    if time_limit is None:
        return None
    from_runtime, seconds = parse_time_limit(time_limit)
    return runtime_start() + seconds - started if from_runtime else seconds


def check_time_left(time_limit: str | None, now: float) -> None:
    """Refuse to start once a ``runtime+`` deadline has passed (exit 2, nothing started).

    Why not a stop (75): 75 says "run the same command again", and again, on this runtime,
    would find the deadline passed again, for ever; nothing but a new runtime or another
    limit can help, and that is what a usage error says.
    """
    span = time_limit_span(time_limit, now)
    if span is None or span > 0:
        return
    started = runtime_start()
    raise UsageError(
        f"--time-limit {time_limit} ran out {_hm(-span)} ago: this runtime started "
        f"{_hm(now - started)} ago ({time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, "
        f"the machine's boot); nothing was started. On a new runtime the same command resumes; "
        "on this one give a plain limit, e.g. --time-limit 30m"
    )


def _hm(seconds: float) -> str:
    """``4h05m``, ``12m``, ``40s``: a span as a person reads it."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"


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
    import urllib.error  # here, not at the top: most launches never poll, and the launcher's
    import urllib.request  # start would pay for http.client, email and ssl on every restart

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
