"""API keys: the key file, hashing and lookup, the reloader, and `python -m gateway keys`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.errors import Forbidden, Unauthorized
from gateway.security.authn import (
    ANONYMOUS,
    Authenticator,
    grpc_scope,
    presented_key,
    required_scope,
)
from gateway.security.keys import (
    KEY_PREFIX,
    KeyFile,
    KeyFileError,
    KeyRecord,
    hash_key,
    load_key_file,
    new_key,
    parse_key_file,
    write_key_file,
)
from gateway.security.reload import KeyStore


def record(key: str, key_id: str = "k1", scopes: tuple[str, ...] = ("predict",)) -> KeyRecord:
    return KeyRecord(key_id, hash_key(key), frozenset(scopes))


def test_keys_are_256_bit_random_and_stored_as_sha256() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    for k in keys:
        assert k.startswith(KEY_PREFIX)
        assert len(k) - len(KEY_PREFIX) == 43  # token_urlsafe(32): 32 bytes, base64url
    key = next(iter(keys))
    digest = hash_key(key)
    assert len(digest) == 64 and key not in digest
    assert KeyFile((record(key),)).to_dict()["keys"][0]["sha256"] == digest


def test_lookup_finds_only_the_exact_key() -> None:
    key = new_key()
    keys = KeyFile((record(key),))
    assert keys.lookup(key) is not None
    for wrong in (key[:-1], key + "x", key.upper(), "", hash_key(key)):
        assert keys.lookup(wrong) is None, wrong


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"keys": [{"id": "a", "sha256": "0" * 64}]}, "scopes"),
        ({"keys": [{"id": "a", "sha256": "xyz", "scopes": ["predict"]}]}, "sha256"),
        ({"keys": [{"id": "a", "sha256": "0" * 64, "scopes": ["root"]}]}, "unknown scope"),
        ({"keys": [{"id": "a b", "sha256": "0" * 64, "scopes": ["read"]}]}, "id must"),
        ({"keys": [{"id": "a", "sha256": "0" * 64, "scopes": ["read"], "rate": -1}]}, "rate"),
        ({"keys": [{"id": "a", "sha256": "0" * 64, "scopes": ["read"], "pw": "x"}]}, "unknown"),
        (
            {
                "keys": [
                    {"id": "a", "sha256": "0" * 64, "scopes": ["read"]},
                    {"id": "a", "sha256": "1" * 64, "scopes": ["read"]},
                ]
            },
            "duplicate",
        ),
        ({"keys": [], "tenants": {"acme": {"burst": 3}}}, "rate"),
        ([1, 2], "mapping"),
    ],
)
def test_invalid_key_files_are_refused(data: object, message: str) -> None:
    with pytest.raises(KeyFileError, match=message):
        parse_key_file(data)


def test_scopes_map_endpoints_and_health_stays_open() -> None:
    assert required_scope("/healthz") is None and required_scope("/readyz") is None
    assert required_scope("/v2/health/live") is None and required_scope("/v2/health/ready") is None
    assert required_scope("/v1/predict") == required_scope("/v1/predict:batch") == "predict"
    assert required_scope("/v2/models/risk/infer") == "predict"
    assert required_scope("/v2/models/risk/versions/2/infer") == "predict"
    assert required_scope("/v1/feedback") == "feedback"
    assert required_scope("/admin/routes") == "admin"
    assert required_scope("/metrics") is None and required_scope("/metrics", True) == "admin"
    assert required_scope("/v2/models/risk") is None
    assert required_scope("/v2/models/risk", protect_metadata=True) == "read"
    assert required_scope("/v2", protect_metadata=True) == "read"
    assert required_scope("/something/new") == "admin"  # closed until mapped


def test_grpc_methods_map_to_the_same_scopes() -> None:
    assert grpc_scope("/inference.GRPCInferenceService/ServerLive") is None
    assert grpc_scope("ServerReady") is None
    assert grpc_scope("/inference.GRPCInferenceService/ModelInfer") == "predict"
    assert grpc_scope("ModelMetadata") is None and grpc_scope("ModelMetadata", True) == "read"
    assert grpc_scope("RepositoryModelUnload") == "admin"


def test_authenticate_contract_for_rest_and_grpc_values() -> None:
    key = new_key()
    keys = KeyFile((KeyRecord("ci", hash_key(key), frozenset({"predict"}), rate=5, tenant="t"),))
    auth = Authenticator(lambda: keys)
    for presented in (key, f"Bearer {key}", f"bearer  {key} "):
        p = auth.authenticate(presented, "predict")
        assert (p.key_id, p.tenant, p.rate) == ("ci", "t", 5)
    with pytest.raises(Unauthorized) as missing:
        auth.authenticate(None, "predict")
    assert missing.value.status == 401 and missing.value.code == "unauthenticated"
    assert missing.value.headers()["WWW-Authenticate"].startswith("Bearer")
    with pytest.raises(Unauthorized):
        auth.authenticate("Bearer " + key[:-2], "predict")
    with pytest.raises(Forbidden) as forbidden:
        auth.authenticate(key, "admin")
    assert forbidden.value.status == 403 and forbidden.value.code == "forbidden"
    assert key not in str(forbidden.value) and key not in json.dumps(forbidden.value.to_dict(None))
    assert auth.authenticate(None, None) is ANONYMOUS  # health: open
    assert Authenticator(lambda: keys, enabled=False).authenticate(None, "admin") is ANONYMOUS


def test_presented_key_reads_bearer_then_x_api_key() -> None:
    assert presented_key("Bearer abc", "zzz") == "abc"
    assert presented_key(None, "zzz") == "zzz"
    assert presented_key(None, None) is None
    assert presented_key("Basic abc") == "Basic abc"  # a wrong key (401), not a missing one


def test_key_store_reloads_changes_and_keeps_old_keys_on_a_bad_edit(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    store = KeyStore(path, interval_s=0.01)
    store.load()
    assert store.current.keys == ()  # missing file: no keys, every request 401
    a, b = new_key(), new_key()
    write_key_file(path, KeyFile((record(a, "a"),)))
    assert store.check() and store.current.lookup(a) is not None
    os.utime(path)  # touched, same content: nothing to do
    assert not store.check()
    write_key_file(path, KeyFile((record(a, "a"), record(b, "b"))))  # rotation overlap
    assert store.check() and store.current.lookup(a) and store.current.lookup(b)
    path.write_text("keys: [{id: a, sha256: nope}]")
    assert not store.check()
    assert store.last_error and store.current.lookup(b) is not None  # old keys still serve
    with pytest.raises(KeyFileError):
        KeyStore(path).load()  # a bad file at start refuses to start


def test_write_is_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "auth" / "keys.yaml"
    write_key_file(path, KeyFile((record(new_key()),)))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in path.parent.iterdir()] == ["keys.yaml"]  # no temp file left


def test_cli_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.yaml"
    args = ["--keys-file", str(path)]
    assert main(["keys", "create", "--scopes", "predict,feedback", "--rate", "5",
                 "--name", "ci", "--tenant", "acme", *args]) == 0  # fmt: skip
    out = capsys.readouterr().out
    key = out.strip().splitlines()[-1]
    assert key.startswith(KEY_PREFIX) and len(key) == 46
    text = path.read_text()
    assert key not in text and hash_key(key) in text
    rec = load_key_file(path).lookup(key)
    assert rec is not None and rec.id == "ci" and rec.scopes == {"predict", "feedback"}
    assert rec.rate == 5 and rec.tenant == "acme" and rec.created

    assert main(["keys", "create", "--scopes", "admin", *args]) == 0  # generated id
    second = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["keys", "create", "--scopes", "admin", "--name", "ci", *args]) == 2  # taken
    assert main(["keys", "create", "--scopes", "root", *args]) == 2
    capsys.readouterr()

    assert main(["keys", "list", *args]) == 0
    listing = capsys.readouterr().out
    assert "ci" in listing and "feedback,predict" in listing and "acme" in listing
    assert hash_key(key) not in listing and key not in listing and second not in listing
    assert hash_key(key)[:8] in listing  # a short prefix tells the keys apart

    assert main(["keys", "revoke", "ci", *args]) == 0
    assert load_key_file(path).lookup(key) is None
    assert load_key_file(path).lookup(second) is not None
    assert main(["keys", "revoke", "ci", *args]) == 1
