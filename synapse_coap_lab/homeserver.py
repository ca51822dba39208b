"""Run a real Synapse homeserver process (SQLite, its own directory, loopback only).

Used by the demo (:mod:`synapse_coap_lab.demo`), the benchmarks and the
integration tests (``tests/harness/synapse_proc.py`` re-exports it). It only
starts ``python -m synapse.app.homeserver`` as a child process: this module
imports neither synapse nor Twisted.

Example::

    from synapse_coap_lab.homeserver import SynapseProcess, free_port

    syn = SynapseProcess(tmp_path / "hs1", "hs1.test", http_port=free_port())
    syn.start()
    ...  # talk to syn.base_url
    syn.stop()

The config is generated here (see :meth:`SynapseProcess.build_config`); tests
extend it with ``extra_config`` (merged recursively over the defaults) and
load modules with ``modules`` (the ``modules:`` list of homeserver.yaml).

Stock HTTPS federation between two processes on loopback: give each a
``tls_federation_port`` and the server name ``"127.0.0.1:<that port>"``.
Synapse resolves a server name that is an IP literal with a port straight to
that address (no SRV, no ``.well-known``) and speaks TLS to it; the listener
gets a self-signed certificate (:func:`self_signed_certificate`) and
``federation_verify_certificates`` is off::

    port = free_port()
    hs = SynapseProcess(dir, f"127.0.0.1:{port}", http_port=free_port(),
                        http_resources=("client",), tls_federation_port=port)
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import ipaddress
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from signedjson.key import generate_signing_key, write_signing_keys

__all__ = [
    "SYNAPSE_PYTHON",
    "SynapseError",
    "SynapseProcess",
    "free_port",
    "scrape_metrics",
    "self_signed_certificate",
    "synapse_version",
]


def scrape_metrics(url: str, tries: int = 5) -> str:
    """Synapse's Prometheus text at ``url``. A scrape can race Synapse itself: its
    ``DynamicCollectorRegistry.collect`` walks the cache-metric hooks in the metrics
    thread while the reactor thread registers a new cache (``RuntimeError: dictionary
    changed size during iteration``, answered 500; seen with Synapse 1.163.2). Such a
    500 is tried again, a few times, after a short pause; any other error is raised."""
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return str(r.read().decode())
        except urllib.error.HTTPError as e:
            if e.code != 500 or attempt == tries - 1:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")  # pragma: no cover


#: The Python that runs Synapse (the project venv's, i.e. the one running the tests).
SYNAPSE_PYTHON = os.environ.get("SYNAPSE_COAP_TEST_PYTHON", sys.executable)


#: Synapse appends ``git describe`` output to its version string when its package sits
#: inside a git work tree (as a venv inside this checkout does): the string would then
#: change with every commit. Synapse processes started here, and :func:`synapse_version`,
#: run git with no repository, so the string is the release's own, stable during a run.
NO_GIT_ENV = {"GIT_DIR": os.path.join(os.sep, "nonexistent", "synapse-coap-no-git")}


@functools.cache
def synapse_version() -> str:
    """The version of the Synapse that :data:`SYNAPSE_PYTHON` runs (``synapse.__version__``)."""
    out = subprocess.run(
        [SYNAPSE_PYTHON, "-c", "import synapse; print(synapse.__version__)"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **NO_GIT_ENV},
    )
    return out.stdout.strip()


def started_log_pattern() -> str:
    """A log line Synapse writes once ``start()`` has loaded the modules.

    From 1.150 (checked; not 1.140) the end of ``synapse.app._base.start()``
    logs "garbage collector: Freezing"; older releases do not log there, and
    the pusher pool's start (just after the modules) is the last line they write.
    """
    release = tuple(int(p) for p in re.findall(r"\d+", synapse_version())[:2])
    if release >= (1, 150):
        return r"garbage collector: Freezing"
    return r"garbage collector: Freezing|Started pushers|Not starting pushers"


_HIGH_RATE = {"per_second": 10000, "burst_count": 100000}


#: ports this process has handed out (never twice)
_HANDED_OUT: set[int] = set()


@functools.cache
def _ephemeral_low() -> int:
    """The lowest port the kernel gives to sockets bound to port 0 (and to outgoing
    connections): ``net.ipv4.ip_local_port_range``."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(kind: str = "tcp") -> int:
    """A currently free port on 127.0.0.1 (``kind`` is "tcp" or "udp") for a listener
    started later.

    Taken below the kernel's ephemeral range where there is room: a port bound to 0 and
    released comes from that range, where any outgoing connection or unbound socket of
    any process may take it before the listener binds it (a Synapse failed to start
    with "Address already in use" on its metrics port that way)."""
    if kind not in ("tcp", "udp"):
        raise ValueError(f"kind must be 'tcp' or 'udp', not {kind!r}")
    stype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    low = min(_ephemeral_low(), 65536)
    first = 10000 if low > 20000 else 1024
    rng = random.SystemRandom()
    for _ in range(200 if low - first > 1000 else 0):
        port = rng.randrange(first, low)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, stype) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, stype) as s:
        s.bind(("127.0.0.1", 0))
        found: int = s.getsockname()[1]
        _HANDED_OUT.add(found)
        return found


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def self_signed_certificate(
    directory: Path, host: str = "127.0.0.1", *, days: int = 30
) -> tuple[Path, Path]:
    """Write ``tls.crt`` and ``tls.key`` (mode 0600) for ``host`` into ``directory``.

    An ECDSA P-256 certificate whose subject alternative name is ``host`` (an
    IP address or a DNS name). Returns ``(certificate path, key path)``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    os.chmod(key_path, 0o600)
    return cert_path, key_path


class SynapseError(RuntimeError):
    """Synapse did not start (or stop) as expected; the message ends with the log tail."""


class SynapseProcess:
    """One Synapse homeserver process with its own directory.

    - ``http_port``: a plain HTTP listener on 127.0.0.1 serving
      ``http_resources`` (default: client and federation); ``None`` = none.
    - ``tls_federation_port``: an HTTPS listener on 127.0.0.1 serving the
      federation (and key) resources with a self-signed certificate, for stock
      federation; ``None`` = none.
    - ``metrics_port``: a Prometheus metrics listener.
    - ``modules``: the ``modules:`` list; ``extra_config``: merged over the
      generated homeserver.yaml (a ``listeners`` key replaces the list).
    - ``env``: extra environment variables for the Synapse process.
    """

    def __init__(
        self,
        workdir: Path,
        server_name: str,
        *,
        http_port: int | None = None,
        metrics_port: int | None = None,
        modules: list[dict[str, Any]] | None = None,
        extra_config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        http_resources: Sequence[str] = ("client", "federation"),
        tls_federation_port: int | None = None,
        worker_of: SynapseProcess | None = None,
        worker: dict[str, Any] | None = None,
    ) -> None:
        """``worker_of`` / ``worker``: run a Synapse worker (``synapse.app.generic_worker``)
        with the main process's homeserver.yaml plus ``worker`` (worker_name,
        worker_listeners, ...; its log config is added). ``http_port`` is then the
        worker listener that /health is polled on."""
        self.worker_of = worker_of
        self.worker = dict(worker) if worker is not None else None
        self.workdir = Path(workdir)
        self.server_name = server_name
        self.http_port = http_port
        self.http_resources = tuple(http_resources)
        self.tls_federation_port = tls_federation_port
        self.tls_certificate_path = self.workdir / "tls.crt"
        self.tls_private_key_path = self.workdir / "tls.key"
        self.metrics_port = metrics_port
        self.modules = list(modules or [])
        self.extra_config = dict(extra_config or {})
        self.env = dict(env or {})
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "homeserver.yaml"
        self.log_path = self.workdir / "homeserver.log"
        self.signing_key_path = self.workdir / f"{server_name}.signing.key"
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: Any = None

    # -- configuration -------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self.http_port is None:
            raise SynapseError("this SynapseProcess has no HTTP listener")
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "homeserver.db"

    def build_config(self) -> dict[str, Any]:
        listeners: list[dict[str, Any]] = []
        if self.http_port is not None:
            listeners.append(
                {
                    "port": self.http_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": list(self.http_resources), "compress": False}],
                }
            )
        if self.tls_federation_port is not None:
            listeners.append(
                {
                    "port": self.tls_federation_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": True,
                    "x_forwarded": False,
                    "resources": [{"names": ["federation"], "compress": False}],
                }
            )
        if self.metrics_port is not None:
            listeners.append(
                {"port": self.metrics_port, "bind_addresses": ["127.0.0.1"], "type": "metrics"}
            )
        config: dict[str, Any] = {
            "server_name": self.server_name,
            "pid_file": str(self.workdir / "homeserver.pid"),
            "listeners": listeners,
            "database": {
                "name": "sqlite3",
                "args": {"database": str(self.database_path)},
            },
            "log_config": str(self.workdir / "log.yaml"),
            "media_store_path": str(self.data_dir / "media_store"),
            "signing_key_path": str(self.signing_key_path),
            "enable_registration": True,
            "enable_registration_without_verification": True,
            "report_stats": False,
            "suppress_key_server_warning": True,
            "trusted_key_servers": [],
            "ip_range_whitelist": ["127.0.0.0/8", "::1/128"],
            "federation_ip_range_blacklist": [],
            "enable_metrics": self.metrics_port is not None,
            "rc_message": _HIGH_RATE,
            "rc_registration": _HIGH_RATE,
            "rc_login": {
                "address": _HIGH_RATE,
                "account": _HIGH_RATE,
                "failed_attempts": _HIGH_RATE,
            },
            "rc_joins": {"local": _HIGH_RATE, "remote": _HIGH_RATE},
            "rc_joins_per_room": _HIGH_RATE,
            "rc_invites": {
                "per_room": _HIGH_RATE,
                "per_user": _HIGH_RATE,
                "per_issuer": _HIGH_RATE,
            },
            "rc_admin_redaction": _HIGH_RATE,
            "rc_room_creation": _HIGH_RATE,
            "rc_presence": {"per_user": _HIGH_RATE},
            "rc_delayed_event_mgmt": _HIGH_RATE,
            "rc_key_requests": _HIGH_RATE,
            "rc_3pid_validation": _HIGH_RATE,
            "rc_media_create": _HIGH_RATE,
            "rc_profile": _HIGH_RATE,
            "rc_reports": _HIGH_RATE,
            "rc_user_directory": _HIGH_RATE,
            "rc_federation": {
                "window_size": 1000,
                "sleep_limit": 10000,
                "sleep_delay": 10,
                "reject_limit": 100000,
                "concurrent": 1000,
            },
            "modules": self.modules,
        }
        if self.tls_federation_port is not None:
            config["tls_certificate_path"] = str(self.tls_certificate_path)
            config["tls_private_key_path"] = str(self.tls_private_key_path)
            config["federation_verify_certificates"] = False
        return _merge(config, self.extra_config)

    def _log_config(self) -> dict[str, Any]:
        return {
            "version": 1,
            "formatters": {
                "precise": {
                    "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - "
                    "%(request)s - %(message)s"
                }
            },
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": str(self.log_path),
                    "encoding": "utf8",
                }
            },
            "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
            "root": {"level": "INFO", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }

    def write_config(self) -> None:
        """(Re)write homeserver.yaml and the log config; create the signing key once."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.signing_key_path.exists():
            fd = os.open(self.signing_key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                write_signing_keys(f, [generate_signing_key("a_test")])
        if self.tls_federation_port is not None and not self.tls_certificate_path.exists():
            self_signed_certificate(self.workdir)
        (self.workdir / "log.yaml").write_text(yaml.safe_dump(self._log_config()))
        if self.worker is not None:
            worker = {
                "worker_app": "synapse.app.generic_worker",
                "worker_log_config": str(self.workdir / "log.yaml"),
                "worker_pid_file": str(self.workdir / "worker.pid"),
                **self.worker,
            }
            self.config_path.write_text(yaml.safe_dump(worker, sort_keys=False))
            return
        self.config_path.write_text(yaml.safe_dump(self.build_config(), sort_keys=False))

    def command(self) -> list[str]:
        if self.worker is None:
            return [SYNAPSE_PYTHON, "-m", "synapse.app.homeserver", "-c", str(self.config_path)]
        if self.worker_of is None:
            raise SynapseError("a worker needs the main process (worker_of)")
        return [
            SYNAPSE_PYTHON,
            "-m",
            "synapse.app.generic_worker",
            "-c",
            str(self.worker_of.config_path),
            "-c",
            str(self.config_path),
        ]

    # -- process control -------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _tail(self, n: int = 40) -> str:
        lines = self.log_text().splitlines()[-n:]
        console = self.workdir / "console.log"
        extra = console.read_text(errors="replace").splitlines()[-n:] if console.exists() else []
        return "\n".join(["--- homeserver.log tail ---", *lines, "--- console tail ---", *extra])

    def start(self, timeout: float = 60.0, ready_log_pattern: str | None = None) -> None:
        """Start Synapse; wait until /health answers (or ``ready_log_pattern`` is logged).

        Without an HTTP listener and without a pattern, waits for the log line
        Synapse writes at the end of its start-up (after loading modules).
        """
        if self.is_running():
            raise SynapseError("already running")
        self.write_config()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = {**os.environ, "SYNAPSE_CACHE_FACTOR": "1.0", **NO_GIT_ENV, **self.env}
        self._console = open(self.workdir / "console.log", "ab")  # noqa: SIM115
        self._proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._console,
            stderr=subprocess.STDOUT,
        )
        pattern = re.compile(ready_log_pattern) if ready_log_pattern else None
        if pattern is None and self.http_port is None:
            pattern = re.compile(started_log_pattern())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SynapseError(
                    f"Synapse exited with code {self._proc.returncode} during start\n{self._tail()}"
                )
            if pattern is not None:
                logged = pattern.search(self.log_text()[log_offset:]) is not None
                if logged and (self.http_port is None or self._health()):
                    return
            elif self._health():
                return
            time.sleep(0.05)
        self.kill()
        raise SynapseError(f"Synapse did not become ready within {timeout} s\n{self._tail()}")

    def _health(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=1) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM and wait (SIGKILL after ``timeout``)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL at once (simulates a crash)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._cleanup()

    def restart(self, timeout: float = 60.0, ready_log_pattern: str | None = None) -> None:
        self.stop()
        self.start(timeout=timeout, ready_log_pattern=ready_log_pattern)

    def _cleanup(self) -> None:
        self._proc = None
        if self._console is not None:
            with contextlib.suppress(OSError):
                self._console.close()
            self._console = None

    def __enter__(self) -> SynapseProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
