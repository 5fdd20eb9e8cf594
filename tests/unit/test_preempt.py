"""The preemption watcher against local stand-ins of the AWS and GCP metadata endpoints (tests/fakes/metadata.py)."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.fakes.metadata import FakeAwsMetadata, FakeGcpMetadata
from workloads.preempt import PreemptionWatcher, aws_notice, aws_token, gcp_preempted


def watch(cloud, url, poll_s=0.05):
    got: list[str] = []
    event = threading.Event()
    watcher = PreemptionWatcher(cloud, lambda why: (got.append(why), event.set()), base=url, poll_s=poll_s,
                                log=lambda text: None)
    watcher.start()
    return watcher, got, event


def test_aws_instance_action_is_404_until_marked_then_the_action_and_time():
    with FakeAwsMetadata() as imds:
        token = aws_token(imds.url)
        assert aws_notice(imds.url, token) is None
        imds.notice("stop")
        assert aws_notice(imds.url, token).startswith("AWS spot interruption: stop at 20")


def test_aws_stand_in_refuses_a_get_without_a_token_as_imdsv2_does():
    with FakeAwsMetadata() as imds:
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(imds.url + "/latest/meta-data/spot/instance-action", timeout=2)
        assert exc.value.code == 401


def test_aws_watcher_notices_within_a_poll_and_renews_an_expired_token():
    with FakeAwsMetadata() as imds:
        watcher, got, event = watch("aws", imds.url)
        time.sleep(0.2)
        assert not got
        imds.expire_tokens()  # the watcher's token is now refused (401): it must take a new one
        time.sleep(0.2)
        imds.notice("terminate")
        assert event.wait(2), "no notice within 2 s of the instance being marked"
        watcher.stop()
        assert got == [got[0]] and "terminate" in got[0]
        assert sum(1 for method, path in imds.requests if method == "PUT") >= 2


def test_gcp_preempted_is_false_then_true_and_needs_the_metadata_flavor_header():
    with FakeGcpMetadata() as gmd:
        assert gcp_preempted(gmd.url, wait=False) is False
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(gmd.url + "/computeMetadata/v1/instance/preempted", timeout=2)
        assert exc.value.code == 403
        gmd.preempt()
        assert gcp_preempted(gmd.url, wait=False) is True


def test_gcp_watcher_long_polls_and_hears_the_change_at_once():
    with FakeGcpMetadata() as gmd:
        watcher, got, event = watch("gcp", gmd.url)
        time.sleep(0.3)
        waits = [p for _, p in gmd.requests if "wait_for_change=true" in p]
        assert waits and len(gmd.requests) <= 3, "the watcher must hold one long poll, not poll in a loop"
        start = time.monotonic()
        gmd.preempt()
        assert event.wait(2)
        assert time.monotonic() - start < 0.5
        watcher.stop()
        assert "TRUE" in got[0]


def test_a_watcher_for_an_unknown_cloud_is_refused():
    with pytest.raises(ValueError, match="aws, gcp"):
        PreemptionWatcher("azure", lambda why: None)
