"""Earth Engine credentials as cloud workloads have them: a metadata server (GKE Workload Identity) and a workload
identity federation file (EKS, Azure), both on loopback, reaching the fake Earth Engine with their token; files
that would send a token elsewhere are refused before any request."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

ee = pytest.importorskip("ee")
pytest.importorskip("xee")

from geosoc.catalog import load_catalog  # noqa: E402
from geosoc.errors import CredentialsError, GeosocError, NotFoundError  # noqa: E402
from geosoc.sources import earthengine, ee_credentials  # noqa: E402
from geosoc.sources.from_catalog import open_layers  # noqa: E402
from tests.helpers import REPO, free_port, tiny_catalog_dict  # noqa: E402

AUDIENCE = "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/eks/providers/oidc"


class TokenServer:
    """A GCE metadata server and a Google STS endpoint on loopback: each hands out its own access token and
    records every request (path, query, form)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._answer(b"")

            def do_POST(self) -> None:
                self._answer(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def _answer(self, body: bytes) -> None:
                url = urlsplit(self.path)
                owner.requests.append({"path": url.path, "query": parse_qs(url.query),
                                       "form": parse_qs(body.decode()), "flavor": self.headers.get("Metadata-Flavor")})
                status, payload = owner.answer(url.path, parse_qs(body.decode()), self.headers)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Type", "application/json" if payload and data[:1] == b"{" else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.address = f"127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, form: dict[str, list[str]], headers: Any) -> tuple[int, Any]:
        metadata = "/computeMetadata/v1/"
        if path.startswith(metadata) and headers.get("Metadata-Flavor") != "Google":
            return 403, b"missing Metadata-Flavor"
        if path in ("/", metadata):
            return 200, b"ok"
        if path == metadata + "project/project-id":
            return 200, b"wi-project"
        if path == metadata + "instance/service-accounts/default/":
            return 200, {"email": "geosoc@wi-project.iam.gserviceaccount.com", "aliases": ["default"],
                         "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}
        if path == metadata + "instance/service-accounts/default/token":
            return 200, {"access_token": "token-from-metadata", "expires_in": 3600, "token_type": "Bearer"}
        if path == "/v1/token" and form.get("subject_token") == ["subject-jwt-from-eks"]:
            return 200, {"access_token": "token-from-sts", "expires_in": 3600, "token_type": "Bearer",
                         "issued_token_type": "urn:ietf:params:oauth:token-type:access_token"}
        return 404, {"error": f"no {path}"}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def token_server() -> Iterator[TokenServer]:
    server = TokenServer()
    yield server
    server.stop()


def closed_port() -> int:
    """A loopback port nobody listens on: a metadata server that is not there answers at once."""
    return free_port()


# Builds a cube from the catalog through the real initialisation and the fake service, printing what it saw.
BUILD = """
import json, sys
import ee
from geosoc.catalog import load_catalog
from geosoc.data.cube import build_cube
from geosoc.sources import earthengine
from tests.ee_fake import fake_layers, serve_offline

tokens = []
serve_offline(tokens)
earthengine.initialize()
catalog = load_catalog(path=sys.argv[1])
layers, fakes = fake_layers(catalog, tokens=tokens)
build_cube(catalog, sys.argv[2], layers=layers, workers=1, progress=False)
print(json.dumps({"tokens": sorted(set(tokens)), "checks_and_calls": len(tokens),
                  "project": ee.data._get_state().cloud_api_user_project}))
"""


def run_build(tmp_path: Path, write_catalog: Any, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    data = tiny_catalog_dict()
    for group in ("imagery", "climate"):
        data[group]["source"] = {"kind": "earthengine"}
    catalog = write_catalog(data, name="ee.yaml")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("GOOGLE_APPLICATION_CREDENTIALS", "GEOSOC_EE_PROJECT") and not k.startswith("GCE_")}
    home = tmp_path / "home"  # no `earthengine authenticate` token, no gcloud file
    home.mkdir()
    full = {**clean, "HOME": str(home), "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", BUILD, str(catalog), str(tmp_path / "cube")], env=full,
                          capture_output=True, text=True, timeout=600)


def test_workload_identity_metadata_server_reaches_earth_engine(token_server: TokenServer, tmp_path: Path,
                                                                write_catalog: Any) -> None:
    """No key file, no token: the credentials a GKE pod has, from its metadata server."""
    done = run_build(tmp_path, write_catalog, {"GCE_METADATA_HOST": token_server.address,
                                               "GCE_METADATA_IP": token_server.address})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["tokens"] == ["token-from-metadata"] and seen["checks_and_calls"] > 1
    assert seen["project"] == "wi-project"  # the metadata server's project, GEOSOC_EE_PROJECT unset
    token_requests = [r for r in token_server.requests if r["path"].endswith("/default/token")]
    assert token_requests and all(r["flavor"] == "Google" for r in token_requests)
    scopes = token_requests[0]["query"]["scopes"][0].split(",")
    assert "https://www.googleapis.com/auth/earthengine" in scopes


def federation_file(path: Path, token_url: str, subject: Path) -> Path:
    subject.write_text("subject-jwt-from-eks")
    path.write_text(json.dumps({
        "type": "external_account", "audience": AUDIENCE,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt", "token_url": token_url,
        "credential_source": {"file": str(subject)},
    }))
    return path


def test_workload_identity_federation_file_reaches_earth_engine(token_server: TokenServer, tmp_path: Path,
                                                                write_catalog: Any) -> None:
    """An `external_account` file (the route from EKS or Azure): its subject token exchanged at the STS."""
    config = federation_file(tmp_path / "federation.json", f"http://{token_server.address}/v1/token",
                             tmp_path / "subject.jwt")
    done = run_build(tmp_path, write_catalog, {"GOOGLE_APPLICATION_CREDENTIALS": str(config),
                                               "GEOSOC_EE_PROJECT": "eks-project",
                                               "GCE_METADATA_IP": f"127.0.0.1:{closed_port()}"})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["tokens"] == ["token-from-sts"] and seen["project"] == "eks-project"
    (exchange,) = [r for r in token_server.requests if r["path"] == "/v1/token"]  # one exchange, then cached
    assert exchange["form"]["audience"] == [AUDIENCE]
    assert "https://www.googleapis.com/auth/earthengine" in exchange["form"]["scope"][0].split()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every outgoing connection attempt, recorded and refused."""
    attempts: list[Any] = []

    def connect(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise ConnectionRefusedError(f"test: no connection to {address}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.fixture
def no_ee_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    ee.Reset()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.delenv("GEOSOC_EE_PROJECT", raising=False)
    yield
    ee.Reset()


@pytest.mark.parametrize("field,url", [
    ("token_url", "https://sts.attacker.example/v1/token"),
    ("token_url", "https://sts.googleapis.com.attacker.example/v1/token"),
    ("token_url", "http://sts.googleapis.com/v1/token"),  # not https: the token would cross the network in clear
    ("service_account_impersonation_url", "https://attacker.example/v1/projects/-/serviceAccounts/x:generateAccessToken"),
])
def test_a_file_that_would_send_a_token_elsewhere_is_refused_before_any_request(
        field: str, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ee_credentials: None,
        no_network: list[Any]) -> None:
    config = federation_file(tmp_path / "federation.json", "https://sts.googleapis.com/v1/token", tmp_path / "s.jwt")
    config.write_text(json.dumps({**json.loads(config.read_text()), field: url}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(config))
    monkeypatch.setenv("GEOSOC_EE_PROJECT", "p")
    with pytest.raises(CredentialsError, match=f"{field} '[^']+' is neither a Google endpoint") as info:
        earthengine.initialize()
    assert str(config) in str(info.value) and "subject-jwt" not in str(info.value)
    assert no_network == []


def test_a_google_federation_file_loads_without_a_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          no_ee_credentials: None, no_network: list[Any]) -> None:
    """Loading (the token is exchanged only when Earth Engine is first called) needs no network."""
    config = federation_file(tmp_path / "f.json", "https://sts.googleapis.com/v1/token", tmp_path / "s.jwt")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(config))
    credentials, project = ee_credentials.find_credentials()
    assert type(credentials).__module__ == "google.auth.identity_pool" and project is None
    assert "https://www.googleapis.com/auth/earthengine" in credentials.scopes
    assert no_network == []


def test_nothing_found_names_every_place_tried(tmp_path: Path, write_catalog: Any) -> None:
    """As a user runs it: `geosoc build-cube` on a machine with no identity at all, one error line."""
    data = tiny_catalog_dict()
    data["imagery"]["source"] = {"kind": "earthengine"}
    catalog = write_catalog(data, name="ee.yaml")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("GOOGLE_APPLICATION_CREDENTIALS", "GEOSOC_EE_PROJECT")}
    env.update(HOME=str(home), GCE_METADATA_IP=f"127.0.0.1:{closed_port()}",
               GCE_METADATA_HOST=f"127.0.0.1:{closed_port()}")
    done = subprocess.run([sys.executable, "-m", "geosoc.cli", "build-cube", "--catalog", str(catalog), "--root",
                           str(tmp_path / "cube"), "-q"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no Earth Engine credentials; tried:"), done.stderr
    for place in ("GOOGLE_APPLICATION_CREDENTIALS (not set)", "earthengine authenticate", "application default",
                  "metadata server", "GEOSOC_EE_PROJECT"):
        assert place in lines[0], place
    assert not (tmp_path / "cube").exists()


def test_unknown_file_type_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      no_ee_credentials: None) -> None:
    config = tmp_path / "odd.json"
    config.write_text(json.dumps({"type": "gdch_service_account", "token_uri": "https://x"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(config))
    with pytest.raises(CredentialsError, match="credential type 'gdch_service_account'; expected one of"):
        earthengine.initialize()


def test_broken_key_file_is_reported_without_its_contents(no_ee_credentials, monkeypatch, tmp_path) -> None:
    key = tmp_path / "key.json"
    key.write_text('{"type": "service_account", "private_key": "-----BEGIN SECRET-----", "client_email": "x"}')
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    with pytest.raises(CredentialsError) as info:
        earthengine.initialize()
    assert "is not a usable Google credentials file" in str(info.value)
    assert "SECRET" not in str(info.value)


def test_missing_key_file(no_ee_credentials, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    with pytest.raises(NotFoundError, match="absent.json, which is not a file"):
        earthengine.initialize()


@pytest.mark.parametrize("failure,message", [
    ("offline", "could not reach Earth Engine (Failed to resolve 'oauth2.googleapis.com'): check this machine's network"),
    ("refused", "Earth Engine did not accept the credentials for project 'p': 403 caller lacks permission"),
])
def test_an_unreachable_earth_engine_is_not_called_a_credentials_problem(failure: str, message: str,
                                                                         no_ee_credentials, monkeypatch) -> None:
    """The token request of a real key fails offline (google-auth's TransportError, caused by a failed name
    resolution; measured: 41 s of retries, hence simulated here at the same seam)."""
    from google.auth.exceptions import TransportError

    def initialize(**kwargs) -> None:
        if failure == "refused":
            raise ee.EEException("403 caller lacks permission")
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except socket.gaierror as cause:
            raise TransportError("Failed to resolve 'oauth2.googleapis.com'") from cause

    monkeypatch.setattr(earthengine, "find_credentials", lambda: (object(), "p"))
    monkeypatch.setattr(ee, "Initialize", initialize)
    with pytest.raises(GeosocError) as info:
        earthengine.initialize()
    assert message in str(info.value)


def test_dry_run_needs_no_credentials(no_ee_credentials) -> None:
    layers = open_layers(load_catalog("conus"))
    assert [layer.group for layer in layers] == ["imagery", "climate"]
