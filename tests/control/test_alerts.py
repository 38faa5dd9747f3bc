"""The expiry alerts (control/alerts.py) and the settings they read (control/settings.py):
pure functions, time pinned to the second (±1 s around every threshold)."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from clustercert.cli import main
from clustercert.clock import parse_iso, utc_now
from clustercert.control.alerts import (
    AlertState,
    CertificateExpiry,
    NodeCertificate,
    changed,
    evaluate,
)
from clustercert.control.directory import ClusterDirectory
from clustercert.control.http import parse_model
from clustercert.control.settings import (
    AlertSettings,
    ClusterSettings,
    ClusterSettingsUpdate,
    changed_keys,
)
from clustercert.errors import InvalidSchema

T0 = dt.datetime(2026, 12, 2, 8, 0, 0, tzinfo=dt.UTC)
SECOND = dt.timedelta(seconds=1)
DAY = dt.timedelta(days=1)
CLUSTER = "cluster_certs_about_to_expire"
NODE = "node_internal_certs_about_to_expire"


def _settings(threshold: int = 45, *, enabled: bool = True) -> AlertSettings:
    alert = {"enabled": enabled, "threshold": threshold}
    return AlertSettings.model_validate(
        {"cluster_certs_about_to_expire": alert, "node_internal_certs_about_to_expire": alert}
    )


@pytest.mark.parametrize(
    ("left", "raised"),
    [(45 * DAY + SECOND, False), (45 * DAY, True), (45 * DAY - SECOND, True), (-SECOND, True)],
)
def test_cluster_alert_raises_at_the_threshold_to_the_second(
    left: dt.timedelta, raised: bool
) -> None:
    desired = [CertificateExpiry("proxy", T0 + left, internal=False)]
    served = [NodeCertificate("node-1", "proxy", T0 + left, internal=False)]
    state = evaluate(desired, served, _settings(45), T0)[CLUSTER]
    assert state.raised is raised
    assert state.state == ("raised" if raised else "cleared")
    assert state.threshold == 45
    if raised:
        (cert,) = state.certificates
        assert (cert.name, cert.nodes, cert.internal) == ("proxy", ("node-1",), False)
        assert cert.seconds_left == int(left.total_seconds())
        assert state.since == T0
        assert state.as_json()["change_value"]["certificates"][0]["source"] == "user"
    else:
        assert state.certificates == () and state.since is None


def test_node_alert_sees_a_node_that_lags_behind_a_renewal() -> None:
    """The desired certificate was renewed (far from expiry), but node-2 still serves the old
    one: only the node alert is raised, and it names node-2 alone."""
    old, new = T0 + 10 * DAY, T0 + 90 * DAY
    desired = [CertificateExpiry("proxy", new, internal=True)]
    served = [
        NodeCertificate("node-1", "proxy", new, internal=True),
        NodeCertificate("node-2", "proxy", old, internal=True),
        NodeCertificate("node-3", "proxy", None, internal=True),  # expiry unknown: not counted
    ]
    states = evaluate(desired, served, _settings(30), T0)
    assert not states[CLUSTER].raised
    node = states[NODE]
    assert node.raised and node.nodes == ("node-2",)
    assert [c.name for c in node.certificates] == ["proxy"]
    assert node.certificates[0].not_after == old


def test_node_alert_ignores_user_certificates() -> None:
    """A user-provided certificate is the cluster alert's business, not the internal one's."""
    soon = T0 + DAY
    states = evaluate(
        [CertificateExpiry("api", soon, internal=False)],
        [NodeCertificate("node-1", "api", soon, internal=False)],
        _settings(30),
        T0,
    )
    assert states[CLUSTER].raised and not states[NODE].raised


def test_since_is_kept_while_raised_and_moves_when_cleared() -> None:
    expiry = T0 + 10 * DAY
    desired = [CertificateExpiry("api", expiry, internal=True)]
    first = evaluate(desired, [], _settings(30), T0)
    later = evaluate(desired, [], _settings(30), T0 + 60 * SECOND, first)
    assert first[CLUSTER].since == later[CLUSTER].since == T0
    assert changed(first, later) == []
    renewed = [CertificateExpiry("api", T0 + 90 * DAY, internal=True)]
    cleared = evaluate(renewed, [], _settings(30), T0 + 120 * SECOND, later)
    assert not cleared[CLUSTER].raised
    assert cleared[CLUSTER].since == T0 + 120 * SECOND
    assert [s.alert for s in changed(later, cleared)] == [CLUSTER]
    assert [s.alert for s in changed({}, first)] == [CLUSTER]  # first sight: only if raised
    assert changed({}, cleared) == []


def test_a_disabled_alert_is_cleared_and_lists_nothing() -> None:
    desired = [CertificateExpiry("api", T0 + DAY, internal=True)]
    raised = evaluate(desired, [], _settings(30), T0)
    disabled = evaluate(desired, [], _settings(30, enabled=False), T0 + SECOND, raised)
    state = disabled[CLUSTER]
    assert (state.enabled, state.raised, state.certificates) == (False, False, ())
    assert state.since == T0 + SECOND
    assert state.as_json() == {
        "enabled": False,
        "state": False,
        "severity": "WARNING",
        "change_time": "2026-12-02T08:00:01Z",
        "change_value": {"state": False, "threshold": 30, "certificates": [], "nodes": []},
    }


def test_a_state_survives_its_json_form() -> None:
    """States are kept in the store between passes (and across control planes)."""
    desired = [CertificateExpiry("api", T0 + DAY, internal=True)]
    served = [NodeCertificate("node-1", "api", T0 + DAY, internal=True)]
    for state in evaluate(desired, served, _settings(30), T0).values():
        assert AlertState.from_json(state.alert, state.as_json()) == state


# --- settings ----------------------------------------------------------------------------------


def test_settings_defaults_follow_redis_enterprise() -> None:
    settings = ClusterSettings()
    assert settings.cert_rotation_job_settings.enabled is True
    assert settings.cert_rotation_job_settings.expiry_days_before_rotation == 60
    assert settings.alert_settings.cluster_certs_about_to_expire.threshold == 45
    assert settings.alert_settings.webhook_url is None


def test_a_partial_update_keeps_the_other_keys() -> None:
    update = ClusterSettingsUpdate.model_validate(
        {"alert_settings": {"cluster_certs_about_to_expire": {"threshold": 10}}}
    )
    new = parse_model(ClusterSettings, update.merged(ClusterSettings()))
    assert new.alert_settings.cluster_certs_about_to_expire.threshold == 10
    assert new.alert_settings.cluster_certs_about_to_expire.enabled is True
    assert changed_keys(ClusterSettings(), new) == {
        "alert_settings.cluster_certs_about_to_expire.threshold": (45, 10)
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"alert_settings": {"typo": 1}}, r"alert_settings\.typo: Extra inputs"),
        (
            {"alert_settings": {"cluster_certs_about_to_expire": {"threshold": "30"}}},
            r"threshold: Input should be a valid integer",
        ),
        (
            {"alert_settings": {"cluster_certs_about_to_expire": {"threshold": 366}}},
            r"threshold: Input should be less than or equal to 365",
        ),
        (
            {"alert_settings": {"node_internal_certs_about_to_expire": {"threshold": 0}}},
            r"threshold: Input should be greater than or equal to 1",
        ),
        ({"alert_settings": {"webhook_url": "http://hooks.example/x"}}, r"must be an https://"),
        ({"alert_settings": {"webhook_url": "https:///path"}}, r"with a host"),
        (
            {"cert_rotation_job_settings": {"expiry_days_before_rotation": 91}},
            r"less than or equal to 90",
        ),
        (
            {"cert_rotation_job_settings": {"expiry_days_before_rotation": 0}},
            r"greater than or equal to 1",
        ),
        ({"cert_rotation_job_settings": {"enabled": 1}}, r"enabled: Input should be a valid bool"),
    ],
)
def test_bad_settings_are_named(body: dict[str, object], message: str) -> None:
    update = parse_model(ClusterSettingsUpdate, body)
    with pytest.raises(InvalidSchema, match=message):
        parse_model(ClusterSettings, update.merged(ClusterSettings()))


def test_unknown_top_level_keys_are_refused() -> None:
    with pytest.raises(InvalidSchema, match=r"alerts: Extra inputs are not permitted"):
        parse_model(ClusterSettingsUpdate, {"alerts": {}})


def test_the_audit_record_hides_a_webhook_token() -> None:
    new = ClusterSettings.model_validate(
        {"alert_settings": {"webhook_url": "https://hooks.example/x?token=s3cret"}}
    )
    assert changed_keys(ClusterSettings(), new) == {
        "alert_settings.webhook_url": (None, "https://hooks.example/x?...")
    }


# --- init --internal-cert-days -----------------------------------------------------------------


def test_init_issues_autogenerated_certificates_for_the_days_asked(tmp_path: Path) -> None:
    before = utc_now()
    assert main(["init", "--dir", str(tmp_path / "c"), "--internal-cert-days", "30",
                 "--admin-password", "pw-pw-pw-pw"]) == 0  # fmt: skip
    directory = ClusterDirectory(tmp_path / "c")
    with directory.open_store() as store:
        state = directory.state(store)
        assert asyncio.run(state.internal_cert_validity()) == 30 * DAY
        records = asyncio.run(state.certificates())
    assert records and all(r.source == "internal" for r in records)
    for record in records:
        left = parse_iso(record.not_after) - before
        assert 30 * DAY - SECOND <= left <= 30 * DAY + SECOND, record.name  # ISO: to the second
    ca_left = directory.ca().cert.not_valid_after_utc - before
    assert ca_left >= 3649 * DAY  # the CA's own validity does not follow the option


@pytest.mark.parametrize("days", ["0", "1826", "ninety"])
def test_init_refuses_a_validity_out_of_range(tmp_path: Path, days: str) -> None:
    assert main(["init", "--dir", str(tmp_path / "c"), "--internal-cert-days", days]) == 2
    assert not (tmp_path / "c").exists()
