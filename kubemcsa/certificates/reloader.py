"""Swap a running TLS server's certificate without a restart, and renew it periodically.

`CertificateReloader.check()` loads a changed certificate/key pair into the server's own `ssl.SSLContext`:
connections already open keep their session, new handshakes get the new certificate. A pair is first read into
memory and validated on a scratch context, and the live context is loaded from that private copy, so a pair that is
half-written or bad never reaches the live context (the old certificate stays, and the reason is logged once).

OpenSSL replaces the certificate and then the key: a handshake started on another thread in that instant could
pair them wrongly. Pass the server's event loop (`loop=`) and the swap runs on the loop's thread, between
handshakes (uvicorn and asyncio servers do their handshakes there).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from kubemcsa.certificates import manager

# kubemcsa.certificates.manager (the Kubernetes client) and kubemcsa.client.tls (cryptography) are imported where
# they are used: every
# serving worker of the webhook runs a CertificateReloader, and its memory stays that of a bare server until a
# certificate is renewed.

log = logging.getLogger(__name__)

LOOP_SWAP_TIMEOUT_SECONDS = 10.0


def _memory_files(contents: tuple[bytes, ...]) -> list[int] | None:
    """Anonymous in-memory files holding `contents` (Linux), or None where they are not available."""
    if not hasattr(os, "memfd_create"):
        return None
    fds: list[int] = []
    try:
        for content in contents:
            fds.append(os.memfd_create("webhook-tls", 0))
            os.write(fds[-1], content)
    except OSError:
        for fd in fds:
            os.close(fd)
        return None
    return fds


@contextlib.contextmanager
def _private_pair(cert_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
    """Paths to a private, immutable copy of the pair (memory files on Linux, so a read-only root works)."""
    fds = _memory_files((cert_pem, key_pem))
    if fds is not None:
        try:
            yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="webhook-tls-") as directory:
        cert_path, key_path = Path(directory, "tls.crt"), Path(directory, "tls.key")
        cert_path.write_bytes(cert_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key_pem)
        yield str(cert_path), str(key_path)


class CertificateReloader:
    """Reloads `cert_file`/`key_file` into `ssl_context` when they change; see the module docstring."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        swap_timeout: float = LOOP_SWAP_TIMEOUT_SECONDS,
    ) -> None:
        self.ssl_context = ssl_context
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.loop = loop
        self.swap_timeout = swap_timeout
        self._lock = threading.Lock()
        self._loaded_digest: str | None = None
        self._rejected_digest: str | None = None
        self._read_problem: str | None = None
        self.reloads = 0

    def __repr__(self) -> str:
        return f"CertificateReloader(cert_file={str(self.cert_file)!r}, key_file={str(self.key_file)!r})"

    def mark_loaded(self) -> None:
        """Record the files' current content as what the context already holds (call after the initial load)."""
        with self._lock:
            pair = self._read()
            if pair is not None:
                self._loaded_digest = pair[0]

    def _read(self) -> tuple[str, bytes, bytes] | None:
        # Content, not mtime: two renewals within one timestamp tick, on a recycled inode, would look unchanged.
        # Reading two small files every few seconds costs microseconds.
        try:
            cert_pem, key_pem = self.cert_file.read_bytes(), self.key_file.read_bytes()
        except OSError as exc:
            problem = f"{exc.strerror}: {exc.filename}"
            if problem != self._read_problem:  # once per distinct problem, not at every check
                log.warning("cannot read the TLS certificate or key (%s); keeping the current one", problem)
            self._read_problem = problem
            return None
        self._read_problem = None
        return hashlib.sha256(cert_pem + b"\0" + key_pem).hexdigest(), cert_pem, key_pem

    def check(self) -> bool:
        """Load the files into the context if they changed and form a valid pair; True if it did. Never raises."""
        with self._lock:
            pair = self._read()
            if pair is None:
                return False
            digest, cert_pem, key_pem = pair
            if digest in (self._loaded_digest, self._rejected_digest):
                return False
            try:
                self._load(cert_pem, key_pem)
            except TimeoutError:
                # Not the pair's fault: the server's loop was busy. Not remembered, so the next check tries again.
                log.warning("the server's event loop did not swap the certificate in time; retrying at the next check")
                return False
            except (ssl.SSLError, OSError, ValueError, RuntimeError) as exc:
                self._rejected_digest = digest
                log.warning(
                    "keeping the current TLS certificate: the pair in %s and %s does not load (%s); "
                    "it is retried when the files change",
                    self.cert_file,
                    self.key_file,
                    getattr(exc, "reason", None) or type(exc).__name__,
                )
                return False
            self._loaded_digest = digest
            self.reloads += 1
            log.info("loaded a new TLS certificate from %s (valid until %s)", self.cert_file, _expiry(cert_pem))
            return True

    def _load(self, cert_pem: bytes, key_pem: bytes) -> None:
        from kubemcsa.client import tls

        if not tls.key_matches(cert_pem, key_pem):
            raise ValueError("the certificate and the key do not belong together")
        with _private_pair(cert_pem, key_pem) as (cert_path, key_path):
            # A scratch context first: a pair that fails there never touches the live context.
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)
            self._on_server_thread(lambda: self.ssl_context.load_cert_chain(cert_path, key_path))

    def _on_server_thread(self, load: Callable[[], None]) -> None:
        loop = self.loop
        if loop is None or loop.is_closed() or not loop.is_running() or _running_loop() is loop:
            load()
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        job_lock = threading.Lock()

        def run() -> None:
            with job_lock:
                if done.cancelled():
                    return  # We gave up waiting: the private files behind `load` are gone.
                try:
                    load()
                except BaseException as exc:
                    done.set_exception(exc)
                else:
                    done.set_result(None)

        loop.call_soon_threadsafe(run)
        try:
            done.result(timeout=self.swap_timeout)
        except concurrent.futures.TimeoutError:
            with job_lock:
                if done.cancel():
                    raise
            done.result()  # It finished while we took the lock.


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _expiry(cert_pem: bytes) -> str:
    from kubemcsa.client import tls

    try:
        return tls.not_after(cert_pem).isoformat()
    except tls.CertificateFormatError:
        return "unknown"


class RenewalLoop:
    """A thread that ensures the certificates every `interval_seconds`, writes the files and reloads the server.

    Errors are logged and retried after `retry_seconds`; stop() ends the thread promptly.
    """

    def __init__(
        self,
        api_client: ApiClient,
        *,
        namespace: str,
        secret_name: str,
        service_name: str,
        webhook_configuration_name: str,
        directory: str | os.PathLike[str],
        reloader: CertificateReloader | None = None,
        interval_seconds: float = 3600.0,
        retry_seconds: float = 30.0,
        run_immediately: bool = False,
        **ensure_options: Any,
    ) -> None:
        self.api_client = api_client
        self.ensure_arguments = {
            "namespace": namespace,
            "secret_name": secret_name,
            "service_name": service_name,
            "webhook_configuration_name": webhook_configuration_name,
            **ensure_options,
        }
        self.directory = directory
        self.reloader = reloader
        self.interval_seconds = interval_seconds
        self.retry_seconds = min(retry_seconds, interval_seconds)
        self.run_immediately = run_immediately
        self.last_bundle: manager.CertificateBundle | None = None
        self.last_error: str | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> manager.CertificateBundle:
        """One round: ensure, write the files, reload. Raises CertificateError or OSError."""
        from kubemcsa.certificates import manager

        bundle = manager.ensure_webhook_certificates(self.api_client, **self.ensure_arguments)
        manager.write_files(bundle, self.directory)
        if self.reloader is not None:
            self.reloader.check()
        for action in bundle.actions:
            log.info("webhook certificates: %s", action)
        self.last_bundle = bundle
        self.last_error = None
        return bundle

    def _run(self) -> None:
        from kubemcsa.certificates import manager

        delay = 0.0 if self.run_immediately else self.interval_seconds
        while not self._stopped.wait(delay):
            try:
                self.run_once()
                delay = self.interval_seconds
            except (manager.CertificateError, OSError) as exc:
                self.last_error = str(exc)
                log.warning("webhook certificate renewal failed, retrying in %ss: %s", self.retry_seconds, exc)
                delay = self.retry_seconds

    def start(self) -> RenewalLoop:
        self._thread = threading.Thread(target=self._run, name="webhook-cert-renewal", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout)
