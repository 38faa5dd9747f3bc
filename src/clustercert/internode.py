"""The internode protocol: every message the control plane and a node agent exchange.

Frozen values, parsed once at the edge that receives them (``from_json``) and written with
``to_json``; the JSON field names are the wire format, so an agent and a control plane of
different versions keep talking as long as these names do not change. A payload that does not
match (not an object, a field missing, renamed or of the wrong type) raises
:class:`MessageError` naming the message and the field: the agent answers it with an error
(422), the control plane's client turns it into ``AgentUnavailable``.

The calls (only the control plane's internal-CA identity may make them, over mutual TLS; the
agent tells it from other internal-CA client certificates by its URI SAN
:data:`CONTROL_PLANE_URI`, see :func:`has_identity`):

========================================================  ===============  =================
call                                                      request body     answer
========================================================  ===============  =================
``GET    /internal/status[?probe=true]``                  none             StatusAnswer
``GET    /internal/status?wait=SECONDS[&boot=ID]``        none             StatusAnswer
``PUT    /internal/certificates/{name}/{generation}``     StageRequest     StageAnswer
``POST   /internal/certificates/{name}/{generation}/commit``  none         CommitAnswer
``DELETE /internal/certificates/{name}/{generation}``     none             AbortAnswer
``DELETE /internal/certificates/{name}``                  none             RemoveAnswer
``PUT    /internal/trust``                                TrustRequest     TrustAnswer
========================================================  ===============  =================

Commit, abort and remove requests carry no body: the path names what they act on
(:class:`Target`; a remove request only a :func:`certificate_name`).

A status request with ``wait`` is a watch (a long-poll, docs/decisions.md "Node status without
polling"): the agent answers at once when ``boot`` is not its own boot id (it restarted since
the caller last saw it), otherwise when ``wait`` seconds have passed (at most
:data:`MAX_WATCH_SECONDS`); while it stops, it refuses the watch (503).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from clustercert.names import NAMES

__all__ = [
    "CONTROL_PLANE_URI",
    "MAX_WATCH_SECONDS",
    "METRICS_SCRAPER_URI",
    "AbortAnswer",
    "CaAnswer",
    "CaRequest",
    "CertificateStatus",
    "CommitAnswer",
    "CsrAnswer",
    "IdentityAnswer",
    "IdentityRequest",
    "LinkProof",
    "MessageError",
    "RemoveAnswer",
    "ServedFingerprint",
    "ServiceProof",
    "StageAnswer",
    "StageRequest",
    "StatusAnswer",
    "Target",
    "TrustAnswer",
    "TrustRequest",
    "certificate_name",
    "has_identity",
]

# URI SANs marking what an internal-CA client certificate may do: the control plane's
# identity calls the internode API; a metrics scraper's only reads the agents' metrics.
CONTROL_PLANE_URI = "urn:clustercert:control-plane"
METRICS_SCRAPER_URI = "urn:clustercert:metrics-scraper"


def has_identity(leaf: x509.Certificate, uri: str) -> bool:
    """Whether ``leaf`` carries the URI SAN ``uri`` (the TLS handshake has checked its CA)."""
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return uri in sans.get_values_for_type(x509.UniformResourceIdentifier)


MAX_WATCH_SECONDS = 900.0  # the longest an agent holds a watch before it answers


class MessageError(ValueError):
    """A payload does not match its internode message; the text names the message and field."""


class _Fields:
    """One JSON object being read as ``message``: checks its field names once, then each
    accessor checks one field's type. Unknown fields are rejected: a renamed field must not
    pass for a missing optional one."""

    def __init__(
        self,
        message: str,
        data: object,
        required: tuple[str, ...],
        optional: tuple[str, ...] = (),
    ) -> None:
        self.message = message
        if not isinstance(data, dict):
            raise MessageError(f"{message}: expected a JSON object, got {_kind(data)}")
        missing = [f for f in required if f not in data]
        if missing:
            raise MessageError(f"{message}: missing field {', '.join(map(repr, missing))}")
        unknown = sorted(str(f) for f in data if f not in required and f not in optional)
        if unknown:
            raise MessageError(
                f"{message}: unknown field {', '.join(map(repr, unknown))}; "
                f"expected {', '.join((*required, *optional))}"
            )
        self.data: dict[str, object] = data

    def _wrong(self, field: str, expected: str) -> MessageError:
        got = _kind(self.data[field])
        return MessageError(f"{self.message}: {field} must be {expected}, got {got}")

    def text(self, field: str) -> str:
        value = self.data[field]
        if isinstance(value, str):
            return value
        raise self._wrong(field, "a string")

    def optional_text(self, field: str) -> str | None:
        value = self.data.get(field)
        if value is None or isinstance(value, str):
            return value
        raise self._wrong(field, "a string or null")

    def number(self, field: str) -> int:
        value = self.data[field]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise self._wrong(field, "an integer")

    def optional_number(self, field: str) -> int | None:
        value = self.data.get(field)
        return None if value is None else self.number(field)

    def numbers(self, field: str) -> tuple[int, ...]:
        value = self.data[field]
        if isinstance(value, list) and all(_is_int(v) for v in value):
            return tuple(value)
        raise self._wrong(field, "a list of integers")

    def real(self, field: str) -> float:
        value = self.data[field]
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise self._wrong(field, "a number")

    def texts(self, field: str) -> tuple[str, ...]:
        value = self.data[field]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise self._wrong(field, "a list of strings")

    def flag(self, field: str) -> bool:
        value = self.data[field]
        if isinstance(value, bool):
            return value
        raise self._wrong(field, "true or false")

    def items(self, field: str) -> list[object]:
        value = self.data[field]
        if isinstance(value, list):
            return value
        raise self._wrong(field, "a list")

    def mapping(self, field: str) -> dict[str, object]:
        value = self.data[field]
        if isinstance(value, dict):
            return value
        raise self._wrong(field, "an object")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


# --- requests -------------------------------------------------------------------------------


def certificate_name(raw: str) -> str:
    """The name in a request's path (all of a remove request): one of the known names."""
    if raw not in NAMES:
        raise MessageError(f"unknown certificate name {raw!r}")
    return raw


@dataclass(frozen=True)
class Target:
    """What a stage, commit or abort request acts on, parsed from its path: one generation
    of one known certificate name."""

    name: str
    generation: int

    @classmethod
    def parse(cls, name: str, generation: str) -> Target:
        if not generation.isdigit():
            raise MessageError(f"generation must be a number, got {generation!r}")
        return cls(certificate_name(name), int(generation))

    @property
    def path(self) -> str:
        return f"/internal/certificates/{self.name}/{self.generation}"


@dataclass(frozen=True)
class StageRequest:
    """The body of a stage: the PEM chain and, unless the name has no key, the PEM key."""

    certificate: str
    key: str | None = None

    @classmethod
    def from_json(cls, data: object) -> StageRequest:
        fields = _Fields("stage request", data, ("certificate",), ("key",))
        return cls(fields.text("certificate"), fields.optional_text("key"))

    def to_json(self) -> dict[str, Any]:
        return {"certificate": self.certificate, "key": self.key}


# --- answers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageAnswer:
    name: str
    generation: int
    staged: bool = True

    @classmethod
    def from_json(cls, data: object) -> StageAnswer:
        fields = _Fields("stage answer", data, ("name", "generation", "staged"))
        return cls(
            fields.text("name"),
            fields.number("generation"),
            fields.flag("staged"),
        )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "generation": self.generation, "staged": self.staged}


@dataclass(frozen=True)
class ServiceProof:
    """What one service proved after a commit: whether it serves the expected certificate,
    the SHA-256 fingerprint it was seen serving (when it was probed), and why not."""

    service: str
    certificate: str
    ok: bool
    served_fingerprint: str | None
    error: str | None = None
    # A verifying handshake (chain to the roots the certificate's clients trust, serverAuth
    # purpose) succeeded: True; it was refused: False; none was made (no listener): None.
    verified: bool | None = None

    @classmethod
    def from_json(cls, data: object) -> ServiceProof:
        fields = _Fields(
            "service proof",
            data,
            ("service", "certificate", "ok", "served_fingerprint", "error"),
            ("verified",),
        )
        verified = fields.data.get("verified")
        if verified is not None and not isinstance(verified, bool):
            raise MessageError(
                f"service proof: verified must be true, false or null, got {verified!r}"
            )
        return cls(
            fields.text("service"),
            fields.text("certificate"),
            fields.flag("ok"),
            fields.optional_text("served_fingerprint"),
            fields.optional_text("error"),
            verified,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "certificate": self.certificate,
            "ok": self.ok,
            "served_fingerprint": self.served_fingerprint,
            "error": self.error,
            **({"verified": self.verified} if self.verified is not None else {}),
        }


@dataclass(frozen=True)
class LinkProof:
    """A link that had to re-establish with the new credentials after a commit (a redis
    replication link): whether it did, how long it took from the forced reconnect, and why not.
    ``link`` says which, e.g. "replication from 127.0.0.1:6379"."""

    service: str
    certificate: str
    link: str
    ok: bool
    seconds: float
    error: str | None = None

    @classmethod
    def from_json(cls, data: object) -> LinkProof:
        fields = _Fields(
            "link proof", data, ("service", "certificate", "link", "ok", "seconds", "error")
        )
        return cls(
            fields.text("service"),
            fields.text("certificate"),
            fields.text("link"),
            fields.flag("ok"),
            fields.real("seconds"),
            fields.optional_text("error"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "certificate": self.certificate,
            "link": self.link,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "error": self.error,
        }


@dataclass(frozen=True)
class CommitAnswer:
    """A commit's result: the generation now current, its leaf's fingerprint, one proof per
    service using the name and one per link that re-established with it (absent from older
    answers); ``ok`` only when every service and link proved it."""

    name: str
    generation: int
    fingerprint: str
    ok: bool
    services: tuple[ServiceProof, ...] = ()
    links: tuple[LinkProof, ...] = ()

    @classmethod
    def from_json(cls, data: object) -> CommitAnswer:
        fields = _Fields(
            "commit answer",
            data,
            ("name", "generation", "fingerprint", "ok", "services"),
            ("links",),
        )
        links = fields.items("links") if "links" in fields.data else []
        return cls(
            fields.text("name"),
            fields.number("generation"),
            fields.text("fingerprint"),
            fields.flag("ok"),
            tuple(ServiceProof.from_json(s) for s in fields.items("services")),
            tuple(LinkProof.from_json(k) for k in links),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "generation": self.generation,
            "fingerprint": self.fingerprint,
            "ok": self.ok,
            "services": [s.to_json() for s in self.services],
            **({"links": [k.to_json() for k in self.links]} if self.links else {}),
        }

    def errors(self) -> list[str]:
        """Why it is not ok: each failing service's and link's error."""
        proofs: list[ServiceProof | LinkProof] = [*self.services, *self.links]
        return [p.error or f"{p.service} did not prove {p.certificate}" for p in proofs if not p.ok]


@dataclass(frozen=True)
class AbortAnswer:
    name: str
    generation: int
    aborted: bool = True

    @classmethod
    def from_json(cls, data: object) -> AbortAnswer:
        fields = _Fields("abort answer", data, ("name", "generation", "aborted"))
        return cls(
            fields.text("name"),
            fields.number("generation"),
            fields.flag("aborted"),
        )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "generation": self.generation, "aborted": self.aborted}


@dataclass(frozen=True)
class RemoveAnswer:
    name: str
    removed: bool = True

    @classmethod
    def from_json(cls, data: object) -> RemoveAnswer:
        fields = _Fields("remove answer", data, ("name", "removed"))
        return cls(fields.text("name"), fields.flag("removed"))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "removed": self.removed}


@dataclass(frozen=True)
class ServedFingerprint:
    """One service's answer to a status probe: the fingerprint it serves now (None: none)."""

    service: str
    served_fingerprint: str | None

    @classmethod
    def from_json(cls, data: object) -> ServedFingerprint:
        fields = _Fields("served fingerprint", data, ("service", "served_fingerprint"))
        return cls(fields.text("service"), fields.optional_text("served_fingerprint"))

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "served_fingerprint": self.served_fingerprint}


@dataclass(frozen=True)
class CertificateStatus:
    """One name on a node's disk: the current generation and its leaf's fingerprint (None
    when no generation is current), the other generations on disk (staged, never current),
    and, only when the status was probed, what each service using it serves."""

    generation: int | None
    fingerprint: str | None
    staged: tuple[int, ...] = ()
    services: tuple[ServedFingerprint, ...] | None = None

    @classmethod
    def from_json(cls, data: object) -> CertificateStatus:
        fields = _Fields(
            "certificate status", data, ("generation", "fingerprint", "staged"), ("services",)
        )
        services = None
        if "services" in fields.data:
            services = tuple(ServedFingerprint.from_json(s) for s in fields.items("services"))
        return cls(
            fields.optional_number("generation"),
            fields.optional_text("fingerprint"),
            fields.numbers("staged"),
            services,
        )

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "generation": self.generation,
            "fingerprint": self.fingerprint,
            "staged": list(self.staged),
        }
        if self.services is not None:
            entry["services"] = [s.to_json() for s in self.services]
        return entry


@dataclass(frozen=True)
class StatusAnswer:
    """What a node holds, per certificate name (:class:`CertificateStatus`), the pid of the
    redis-server it supervises, if any (informational), and the agent's boot id: a random id
    the agent picks when it starts, so the control plane tells a restarted agent from the one
    it watched. Both are absent from older answers."""

    node_id: int
    name: str
    certificates: Mapping[str, CertificateStatus]
    redis_pid: int | None = None
    # SHA-256 fingerprints of the roots pinned on the node (PUT /internal/trust); None from an
    # agent that does not report them.
    pinned: tuple[str, ...] | None = None
    boot_id: str | None = None
    # The SHA-256 fingerprint of the node's internode identity, and of every CA its ``ca.pem``
    # holds (the CAs it trusts for the control plane): the internal CA rotation reads them.
    identity: str | None = None
    ca: tuple[str, ...] | None = None
    # Whether the node runs an etcd member, which restarts to load a new pinned root (so such
    # nodes are pinned one at a time); None from an agent that does not report it.
    etcd_member: bool | None = None

    @classmethod
    def from_json(cls, data: object) -> StatusAnswer:
        fields = _Fields(
            "status answer",
            data,
            ("node_id", "name", "certificates"),
            ("redis_pid", "pinned", "boot_id", "identity", "ca", "etcd_member"),
        )
        return cls(
            fields.number("node_id"),
            fields.text("name"),
            {
                str(name): CertificateStatus.from_json(entry)
                for name, entry in fields.mapping("certificates").items()
            },
            fields.optional_number("redis_pid"),
            fields.texts("pinned") if "pinned" in fields.data else None,
            fields.optional_text("boot_id"),
            fields.optional_text("identity"),
            fields.texts("ca") if "ca" in fields.data else None,
            fields.flag("etcd_member") if "etcd_member" in fields.data else None,
        )

    def to_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "node_id": self.node_id,
            "name": self.name,
            "certificates": {n: c.to_json() for n, c in self.certificates.items()},
            "redis_pid": self.redis_pid,
            **({"pinned": list(self.pinned)} if self.pinned is not None else {}),
            **({"boot_id": self.boot_id} if self.boot_id is not None else {}),
            **({"identity": self.identity} if self.identity is not None else {}),
            **({"ca": list(self.ca)} if self.ca is not None else {}),
            **({"etcd_member": self.etcd_member} if self.etcd_member is not None else {}),
        }
        return answer


@dataclass(frozen=True)
class TrustRequest:
    """The roots (PEM, one certificate each) to pin in every trust bundle of the node; it
    replaces the pinned set (an empty list unpins every root)."""

    roots: tuple[str, ...]

    @classmethod
    def from_json(cls, data: object) -> TrustRequest:
        fields = _Fields("trust request", data, ("roots",))
        return cls(fields.texts("roots"))

    def to_json(self) -> dict[str, Any]:
        return {"roots": list(self.roots)}


@dataclass(frozen=True)
class TrustAnswer:
    """What the node trusts now: the pinned roots' fingerprints and, per service with a trust
    bundle, the fingerprints of every CA in the bundle it loaded."""

    pinned: tuple[str, ...]
    bundles: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_json(cls, data: object) -> TrustAnswer:
        fields = _Fields("trust answer", data, ("pinned", "bundles"))
        bundles: dict[str, tuple[str, ...]] = {}
        for service, roots in fields.mapping("bundles").items():
            if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
                raise MessageError(f"trust answer: bundles.{service} must be a list of strings")
            bundles[str(service)] = tuple(roots)
        return cls(fields.texts("pinned"), bundles)

    def to_json(self) -> dict[str, Any]:
        return {
            "pinned": list(self.pinned),
            "bundles": {s: list(r) for s, r in self.bundles.items()},
        }


@dataclass(frozen=True)
class CaRequest:
    """The internal CA certificates (PEM, one each) the node must trust from now on: its
    ``ca.pem`` (the control plane's client certificates, redis trust bundles). During an
    internal CA rotation it holds the old and the new CA, afterwards the new one only."""

    certificates: tuple[str, ...]

    @classmethod
    def from_json(cls, data: object) -> CaRequest:
        fields = _Fields("ca request", data, ("certificates",))
        certificates = fields.texts("certificates")
        if not certificates:
            raise MessageError("ca request: certificates must not be empty")
        return cls(certificates)

    def to_json(self) -> dict[str, Any]:
        return {"certificates": list(self.certificates)}


@dataclass(frozen=True)
class CaAnswer:
    """What the node trusts after a CA request: the fingerprints in its ``ca.pem`` (which its
    internode listener now verifies client certificates against), and per service with a
    trust bundle, the fingerprints in the bundle it loaded."""

    ca: tuple[str, ...]
    bundles: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_json(cls, data: object) -> CaAnswer:
        fields = _Fields("ca answer", data, ("ca", "bundles"))
        bundles: dict[str, tuple[str, ...]] = {}
        for service, roots in fields.mapping("bundles").items():
            if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
                raise MessageError(f"ca answer: bundles.{service} must be a list of strings")
            bundles[str(service)] = tuple(roots)
        return cls(fields.texts("ca"), bundles)

    def to_json(self) -> dict[str, Any]:
        return {"ca": list(self.ca), "bundles": {s: list(r) for s, r in self.bundles.items()}}


@dataclass(frozen=True)
class CsrAnswer:
    """A certificate signing request for the node's next internode identity (its key stays on
    the node, ``identity/next-key.pem``), and the fingerprint of the identity it serves now."""

    csr: str
    identity: str

    @classmethod
    def from_json(cls, data: object) -> CsrAnswer:
        fields = _Fields("csr answer", data, ("csr", "identity"))
        return cls(fields.text("csr"), fields.text("identity"))

    def to_json(self) -> dict[str, Any]:
        return {"csr": self.csr, "identity": self.identity}


@dataclass(frozen=True)
class IdentityRequest:
    """The node's new internode identity (PEM chain, leaf first), signed from its CSR."""

    certificate: str

    @classmethod
    def from_json(cls, data: object) -> IdentityRequest:
        fields = _Fields("identity request", data, ("certificate",))
        return cls(fields.text("certificate"))

    def to_json(self) -> dict[str, Any]:
        return {"certificate": self.certificate}


@dataclass(frozen=True)
class IdentityAnswer:
    """The fingerprint of the identity the node's internode listener serves to new
    handshakes."""

    identity: str

    @classmethod
    def from_json(cls, data: object) -> IdentityAnswer:
        fields = _Fields("identity answer", data, ("identity",))
        return cls(fields.text("identity"))

    def to_json(self) -> dict[str, Any]:
        return {"identity": self.identity}
