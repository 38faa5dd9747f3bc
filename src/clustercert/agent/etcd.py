"""The node's etcd member as one more service of the agent: ``ccs_internode_encryption``.

- commit: ``tls/current`` is switched to the committed generation's directory with one rename
  (etcd re-reads its files on every new handshake; :mod:`clustercert.etcdmember`);
- proof: a handshake to the member's client port and to its peer port, each serving the new
  certificate (and verifying against the roots its clients trust); then etcd's ``/health``
  through this member, on a new connection that presents the new certificate as a client: the
  member accepts it, and it has a leader (its peers talk to it);
- trust: the member's trusted CA file holds the internal CA (the control planes present their
  internal-CA identity as etcd clients) and the roots the control plane pins. etcd reads that
  file only when it starts, so a bundle that gained a root restarts the member (supervised;
  the control plane pins such a root on one node at a time); one that only lost roots is
  written and takes effect at the next start (a root stays trusted a little longer, never
  shorter), except when the internal CA rotation retires the old CA (``drop_now``): then the
  member restarts too (node after node), so the store stops accepting the old CA at once.

Who runs the member: the agent (``supervise``, the default: it starts the member when it does
not run, and restarts it itself), or another process manager such as systemd, with ``command``
the restart (``["systemctl", "restart", "clustercert-etcd"]``) and ``supervise = false``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from pathlib import Path

from cryptography import x509

from clustercert import etcdmember, pki
from clustercert.agent.config import ServiceConfig
from clustercert.agent.probe import probe
from clustercert.agent.services import ReloadFailed, Service, run_command
from clustercert.agent.trust import read_certificates
from clustercert.certfiles import GenerationPaths, write_atomically
from clustercert.internode import LinkProof, ServiceProof

__all__ = ["EtcdService"]

log = logging.getLogger("clustercert.agent.etcd")

RESTART_TIMEOUT = 8.0  # below the control plane's default --agent-timeout (10 s)


class EtcdService(Service):
    """One etcd member (``config.etcd``) serving ``ccs_internode_encryption``."""

    def __init__(self, config: ServiceConfig, probe_timeout: float, ca_file: Path) -> None:
        super().__init__(config, probe_timeout)
        assert config.etcd is not None
        self.spec = config.etcd
        self.ca_file = ca_file  # the internal CA: always trusted
        # The roots the running member loaded (fingerprints); None: not known yet.
        self.loaded: frozenset[str] | None = None

    def _client_context(self) -> ssl.SSLContext:
        """This member's own client: its current certificate, trusting its CA bundle. The
        agent reaches its member by the configured URL; the name check is the clients' job."""
        context = etcdmember.client_context(
            self.spec.ca_file, self.spec.cert_file, self.spec.key_file
        )
        context.check_hostname = False
        return context

    # --- certificate ----------------------------------------------------------------------

    async def reload(self, certificate: str, paths: GenerationPaths) -> None:
        if paths.key is None:
            raise ReloadFailed(f"{certificate} has no key; etcd needs one")
        etcdmember.point_at(self.spec, paths.cert.parent)
        if not await self._runs():
            if not self.config.supervise:
                raise ReloadFailed(f"etcd member {self.spec.name} does not run")
            await self._start()

    async def verify(
        self, certificate: str, expected: str, anchors_pem: str | None = None
    ) -> ServiceProof:
        """Both ports serve ``expected``: the client port (clients, the control planes) and the
        peer port (the other members)."""
        results = await asyncio.gather(
            *(
                probe(host, port, expected, self.config.sni, self.probe_timeout, anchors_pem)
                for host, port in (self.spec.client_address, self.spec.peer_address)
            )
        )
        errors = [
            f"{kind} port: {r.error}"
            for kind, r in zip(("client", "peer"), results, strict=True)
            if r.error
        ]
        verified = None if anchors_pem is None else all(r.verified for r in results)
        return ServiceProof(
            self.name,
            certificate,
            all(r.ok for r in results),
            results[0].served,
            "; ".join(errors) or None,
            verified,
        )

    async def prove_links(self, certificate: str) -> list[LinkProof]:
        """etcd's ``/health`` through this member on a new connection presenting the new
        certificate: it must accept it and have a leader."""
        link = f"etcd member {self.spec.name} /health"
        started = time.monotonic()
        try:
            context = self._client_context()
        except (OSError, ssl.SSLError) as exc:
            return [LinkProof(self.name, certificate, link, False, 0.0, str(exc))]
        reason = await asyncio.to_thread(
            etcdmember.wait_healthy, self.spec.client_url, context, self.config.link_timeout
        )
        seconds = time.monotonic() - started
        return [LinkProof(self.name, certificate, link, reason is None, seconds, reason)]

    # --- trust ----------------------------------------------------------------------------

    def trust_names(self) -> frozenset[str]:
        return self.certificates()  # the members present ccs_internode_encryption to each other

    async def trust(self, roots: list[x509.Certificate], drop_now: bool = False) -> tuple[str, ...]:
        fixed = read_certificates(self.ca_file)
        if self.config.extra_ca_file is not None:
            fixed += read_certificates(self.config.extra_ca_file)
        unique = {pki.fingerprint_sha256(c): c for c in [*fixed, *roots]}
        wanted = frozenset(unique)
        before = self._bundle()
        if before != wanted:
            self.spec.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            content = pki.certificates_to_pem(unique[f] for f in sorted(unique))
            write_atomically(self.spec.ca_file, content.encode(), 0o644)
        if not await self._runs():
            self.loaded = wanted  # loaded when it starts
            return tuple(sorted(wanted))
        if self.loaded is None:
            self.loaded = before  # adopted: it runs with what the file held
        # A root that only left the bundle stays trusted until the next start, unless it must
        # go now (``drop_now``: the CA rotation retires the old internal CA; a running member
        # would otherwise go on accepting clients with certificates from it, and the rotation
        # waits until no bundle holds it). The CA rotation does this one node at a time too.
        if wanted - self.loaded or (drop_now and self.loaded - wanted):
            if not (self.config.supervise or self.config.command):
                raise ReloadFailed(
                    f"etcd reads {self.spec.ca_file} only when it starts: restart member "
                    f"{self.spec.name} to load its trust bundle, or configure its restart "
                    "(command) or supervise = true"
                )
            gained, dropped = len(wanted - self.loaded), len(self.loaded - wanted)
            await self._restart(
                f"trust {gained} new root(s)"
                + (f" and drop {dropped}" if drop_now and dropped else "")
            )
            self.loaded = wanted
        return tuple(sorted(self.loaded))

    def _bundle(self) -> frozenset[str]:
        try:
            return frozenset(
                pki.fingerprint_sha256(c) for c in read_certificates(self.spec.ca_file)
            )
        except (FileNotFoundError, ValueError):
            return frozenset()

    # --- process --------------------------------------------------------------------------

    async def _runs(self) -> bool:
        """The member runs: its pid file names a live process (the agent's or the demo's), or
        its client port accepts connections (run by another process manager)."""
        if etcdmember.running_pid(self.spec) is not None:
            return True
        host, port = self.spec.client_address
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True

    async def _restart(self, why: str) -> None:
        """Restart the member so that it loads its bundle (``why``: to trust/drop what)."""
        started = time.monotonic()
        if self.config.command:
            await self._run_restart_command()
            reason = await asyncio.to_thread(
                etcdmember.wait_healthy,
                self.spec.client_url,
                self._client_context(),
                RESTART_TIMEOUT,
            )
        else:
            reason = await asyncio.to_thread(
                etcdmember.restart, self.spec, self._client_context(), RESTART_TIMEOUT
            )
        if reason is not None:
            raise ReloadFailed(
                f"etcd member {self.spec.name} restarted to {why} but is "
                f"not healthy within {RESTART_TIMEOUT:g} s: {reason}; see {self.spec.log_file}"
            )
        log.info(
            "etcd member %s restarted to %s: healthy after %.3f s",
            self.spec.name, why, time.monotonic() - started,
        )  # fmt: skip

    async def _run_restart_command(self) -> None:
        await run_command(list(self.config.command), RESTART_TIMEOUT, "restarting etcd")

    async def _start(self) -> None:
        """Start the member and wait (bounded) until its client port accepts connections; it
        is healthy only once a quorum of members runs."""
        await asyncio.to_thread(etcdmember.start, self.spec)
        host, port = self.spec.client_address
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
                return
            await asyncio.sleep(0.05)
        raise ReloadFailed(f"etcd member {self.spec.name} did not listen on {host}:{port} in 5 s")

    async def start(self, current: dict[str, GenerationPaths]) -> None:
        """Point the member at the current generation (if any: before the node's first commit
        it keeps the files it was bootstrapped with) and start it unless it runs; a running
        member is adopted. Stopping the agent leaves the member running."""
        paths = current.get(self.config.certificate)
        if paths is not None and paths.key is not None:
            etcdmember.point_at(self.spec, paths.cert.parent)
        if self.config.supervise and not await self._runs():
            await self._start()
