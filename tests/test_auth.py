"""MONAI Label's authentication, enabled as ``docs/app.md`` ("Exposing the server") says, on a real server.

A Keycloak stand-in on 127.0.0.1 (an ``http.server`` thread) serves the realm's JSON with its RSA
``public_key``, its OpenID configuration and a password token endpoint that signs RS256 tokens with a key pair
made for the test. The server is started with exactly the documented variables; a user logs in with
``POST /auth/token`` and sends the token as ``Authorization: Bearer``. Then:

- a valid token works (MONAI Label 0.8.5 refused every token: PyJWT's ``decode`` without ``algorithms``);
- every endpoint without a token, or with a bad one (expired, another key, ``alg: none``, HMAC with the
  public key, no roles claim), answers 401 and nothing else: ``/reload``, ``/logs`` and ``/proxy`` included,
  and requests the request guard would refuse (unknown image, path-like names) are 401, not 422;
- ``POST /reload`` is refused even with a token, and the server's thread count does not grow.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from app_helpers import REPO, copy_app, start_server

REALM = "monailabel"
USERS = {"ann": ("secret", ["monailabel-user", "monailabel-annotator", "monailabel-admin"])}
SHAPE = (12, 10, 8)
AFFINE = np.diag([1.5, 1.2, 3.0, 1.0])


def _key_pair():
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, private.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo), der


def _claims(user: str, roles, lifetime_s: int = 300) -> dict:
    now = int(time.time())
    return {"preferred_username": user, "email": f"{user}@example.org", "name": user, "iat": now,
            "exp": now + lifetime_s, "realm_access": {"roles": list(roles)}}


class Realm:
    """A Keycloak stand-in: ``/realms/<realm>`` (public key), OpenID configuration and password grant."""

    def __init__(self):
        self.private_pem, self.public_pem, der = _key_pair()
        public_key = base64.b64encode(der).decode()
        realm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == f"/realms/{REALM}":
                    self._json(200, {"realm": REALM, "public_key": public_key, "token-service": realm.uri})
                elif self.path == f"/realms/{REALM}/.well-known/openid-configuration":
                    self._json(200, {"issuer": realm.uri, "token_endpoint": f"{realm.uri}/protocol/openid-connect/token"})
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                user = USERS.get(form.get("username", ""))
                if self.path != f"/realms/{REALM}/protocol/openid-connect/token" or user is None \
                        or user[0] != form.get("password") or form.get("grant_type") != "password":
                    self._json(401, {"error": "invalid_grant"})
                    return
                token = jwt.encode(_claims(form["username"], user[1]), realm.private_pem, algorithm="RS256")
                self._json(200, {"access_token": token, "token_type": "Bearer", "expires_in": 300})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.httpd.server_port}/realms/{REALM}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _documented_environment(realm_uri: str) -> dict:
    """The ``KEY=value`` lines of the auth block in docs/app.md's "Exposing the server", with the realm URI
    replaced by the stand-in's: the test uses what the doc tells users to set, nothing else."""
    text = (REPO / "docs" / "app.md").read_text()
    section = text.split("### Exposing the server", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section.split("authentication", 1)[1], re.S).group(1)
    env = {}
    for line in block.splitlines():
        match = re.match(r"^export (MONAI_LABEL_AUTH_\w+)=(\S+)", line.strip())
        if match:
            env[match.group(1)] = match.group(2)
    assert env.get("MONAI_LABEL_AUTH_ENABLE") == "true", block
    assert "MONAI_LABEL_AUTH_REALM_URI" in env, block
    env["MONAI_LABEL_AUTH_REALM_URI"] = realm_uri
    return env


@pytest.fixture(scope="module")
def realm():
    stand_in = Realm()
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def server(realm, mini_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    studies = root / "studies"
    studies.mkdir()
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.normal(0, 100, SHAPE).astype(np.float32), AFFINE), str(studies / "img.nii.gz"))
    env = _documented_environment(realm.uri)
    env.update({"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSION_PATH": str(root / "sessions")})
    srv = start_server(copy_app(root / "app"), studies,
                       {"model": "vit_mini", "checkpoint": str(mini_checkpoint), "labels": "spleen=1,liver=2",
                        "device": "cpu", "preload": "false", "extension": "off"},
                       log_path=root / "server.log", env=env, ready_path="/auth/")
    srv.studies = studies
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def token(server):
    """Logged in as the doc says: POST /auth/token with the user's name and password."""
    response = requests.post(f"{server.url}/auth/token", data={"username": "ann", "password": "secret"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def test_a_wrong_password_is_401(server):
    response = requests.post(f"{server.url}/auth/token", data={"username": "ann", "password": "wrong"}, timeout=30)
    assert response.status_code == 401 and "wrong user name or password" in response.text


def _label_bytes() -> bytes:
    array = np.zeros(SHAPE, dtype=np.uint8)
    array[2:6, 3:7, 1:4] = 1
    return nib.Nifti1Image(array, AFFINE).to_bytes()


def test_a_valid_rs256_token_works(server, token):
    headers = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{server.url}/auth/token/valid", headers=headers, timeout=30).json()["username"] == "ann"
    assert requests.get(f"{server.url}/info/", headers=headers, timeout=30).status_code == 200
    assert requests.get(f"{server.url}/datastore/", headers=headers, timeout=30).json()["total"] == 1
    saved = requests.put(f"{server.url}/datastore/label", params={"image": "img"}, headers=headers,
                         files={"label": ("img.nii", _label_bytes())}, timeout=60)
    assert saved.status_code == 200, saved.text
    # The request guard still answers an authenticated caller, with its message.
    guarded = requests.post(f"{server.url}/infer/sam_med3d", params={"image": "../outside"}, headers=headers,
                            timeout=30)
    assert guarded.status_code == 422 and "not a path" in guarded.text


def _requests_without_token():
    label = ("x.sh", b"#!/bin/sh\n")
    return [
        ("GET", "/", {}), ("GET", "/openapi.json", {}), ("GET", "/docs", {}), ("GET", "/info/", {}),
        ("POST", "/reload", {}), ("GET", "/logs/", {}), ("GET", "/logs/gpu", {}),
        ("GET", "/proxy/dicom/qido/studies", {}), ("POST", "/proxy/dicom/stow/studies", {"data": b"x"}),
        ("GET", "/ohif/", {}), ("GET", "/datastore/", {}), ("GET", "/datastore/image", {"params": {"image": "img"}}),
        ("HEAD", "/datastore/image", {"params": {"image": "img", "check_sum": "bad:1"}}),
        ("GET", "/datastore/image", {"params": {"image": "../../etc/passwd"}}),
        ("GET", "/datastore/dataset", {}), ("PUT", "/datastore/image/info", {"params": {"image": "img"},
                                                                            "data": {"info": "{}"}}),
        ("PUT", "/datastore/label", {"params": {"image": "nope"}, "files": {"label": label}}),
        ("DELETE", "/datastore/image", {"params": {"id": "img"}}),
        ("POST", "/infer/sam_med3d", {"params": {"image": "nope"}}),
        ("POST", "/infer/sam_med3d", {"params": {"image": "/etc/passwd"}}),
        ("POST", "/infer/unknown_model", {}), ("POST", "/train/sam_med3d", {"json": {}}),
        ("GET", "/train/", {}), ("POST", "/activelearning/random", {"json": {}}),
        ("POST", "/scoring/sam_med3d_uncertainty", {"json": {}}), ("GET", "/model/sam_med3d", {}),
        ("PUT", "/session/", {"files": {"files": ("a.nii.gz", b"x")}}), ("GET", "/session/abc", {}),
        ("GET", "/auth/token/valid", {}),
    ]


def test_every_endpoint_without_a_token_answers_401_and_nothing_else(server):
    answered = {}
    for method, path, kwargs in _requests_without_token():
        response = requests.request(method, f"{server.url}{path}", timeout=30, **kwargs)
        answered[f"{method} {path} {kwargs.get('params', '')}"] = response.status_code
    wrong = {request: status for request, status in answered.items() if status != 401}
    assert not wrong, f"answered without a token: {wrong}"


def test_bad_tokens_are_401(server, realm, token):
    other_pem = _key_pair()[0]
    claims = _claims("ann", USERS["ann"][1])
    no_roles = {k: v for k, v in claims.items() if k != "realm_access"}
    bad = {
        "expired": jwt.encode(_claims("ann", USERS["ann"][1], lifetime_s=-60), realm.private_pem, algorithm="RS256"),
        "another key": jwt.encode(claims, other_pem, algorithm="RS256"),
        "alg none": jwt.encode(claims, None, algorithm="none"),
        "HMAC with the public key": _hmac_token(claims, realm.public_pem),
        "no roles claim": jwt.encode(no_roles, realm.private_pem, algorithm="RS256"),
        "tampered": token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"),
        "garbage": "not.a.token",
    }
    for name, value in bad.items():
        for path in ("/info/", "/datastore/"):
            response = requests.get(f"{server.url}{path}", headers={"Authorization": f"Bearer {value}"}, timeout=30)
            assert response.status_code == 401, (name, path, response.status_code, response.text[:200])


def _hmac_token(claims: dict, secret: bytes) -> str:
    """An HS256 token keyed with the realm's public key (the algorithm-confusion attack); PyJWT refuses to make
    one, so it is put together by hand."""
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def test_reload_is_refused_and_leaks_no_threads(server, token):
    headers = {"Authorization": f"Bearer {token}"}
    process = psutil.Process(server.process.pid)
    workers = [p for p in [process] + process.children(recursive=True) if "monailabel.main" in " ".join(p.cmdline())]
    server_process = workers[0] if workers else process
    before = server_process.num_threads()
    for _ in range(5):
        response = requests.post(f"{server.url}/reload", headers=headers, timeout=30)
        assert response.status_code == 403 and "restart the server" in response.json()["detail"]
    assert requests.get(f"{server.url}/info/", headers=headers, timeout=30).status_code == 200
    assert server_process.num_threads() <= before + 2
