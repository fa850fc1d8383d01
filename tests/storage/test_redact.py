"""redact(): no credential in a URL survives into a log line, a run file or a bucket record."""

from __future__ import annotations

import json

import pytest

from tlaunch.storage import redact

LEAKS = {
    # userinfo, including secrets with "/", "+" and ":" (AWS secret keys have "/" and "+")
    "s3://KEY:se/cr+et@bkt/run1": ("se/cr+et", "KEY"),
    "s3://AKIAEXAMPLE:wJalr/K7MDENG+bPxRfi:Y@bucket/x": (
        "wJalr",
        "K7MDENG",
        "bPxRfi",
        "AKIAEXAMPLE",
    ),
    "gs://oauth-token@bucket/run": ("oauth-token",),
    "https://user:p@ss@host.example/x": ("p@ss", "user:"),
    # query-string tokens: presigned S3/GCS URLs, SAS, OAuth
    "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F2024&X-Amz-Signature=abc123": (
        "abc123",
        "AKIA%2F2024",
    ),
    "https://storage.googleapis.com/b/o?X-Goog-Signature=deadbeef&X-Goog-Date=1": ("deadbeef",),
    "https://acct.blob.core.windows.net/c?sv=2022&sig=SASSIG%3D": ("SASSIG",),
    "https://h/x?token=T0K3N": ("T0K3N",),
    "https://h/x?a=1&access_token=ya29.AAA&b=2": ("ya29.AAA",),
    "https://h/x?key=APIKEY1&alt=json": ("APIKEY1",),
    "https://h/x?X-Amz-Security-Token=SESSION+TOKEN/x": ("SESSION",),
}


@pytest.mark.parametrize("url", sorted(LEAKS))
def test_secrets_are_gone(url):
    text = f"flushed ckpts to {url} (3 files)"
    out = redact(text)
    for secret in LEAKS[url]:
        assert secret not in out, out
    assert out.startswith("flushed ckpts to ") and out.endswith(" (3 files)")
    assert "***" in out


KEPT = [
    "gs://bucket/run1/step-000000100",
    "s3://bucket/users/alice@example.com/data.tlar",  # an "@" in the path is not userinfo
    "/content/drive/MyDrive/runs/exp1",
    "https://h/x?alt=json&prefix=run1%2F",
    "tlaunch: running -> stopping (SIGTERM)",
]


@pytest.mark.parametrize("text", KEPT)
def test_what_holds_no_secret_is_left_alone(text):
    assert redact(text) == text


def test_the_rest_of_the_url_stays_readable():
    assert redact("s3://KEY:se/cr+et@bkt/run1") == "s3://***@bkt/run1"
    assert redact("https://h/x?a=1&token=T&b=2") == "https://h/x?a=1&token=***&b=2"


def test_json_stays_json():
    doc = {"sync_dir": ["c=s3://K:s/e+c@b/r", "d=gs://b/r?sig=S1"], "run": "gs://b/x"}
    out = json.loads(redact(json.dumps(doc)))
    assert out == {"sync_dir": ["c=s3://***@b/r", "d=gs://b/r?sig=***"], "run": "gs://b/x"}
