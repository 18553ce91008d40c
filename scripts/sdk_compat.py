#!/usr/bin/env python3
"""Wire compatibility with Yandex's own code, independent of the Rust side.

1. The unmodified Yandex Cloud Python SDK (`yandexcloud`), pointed at the sidecar with
   YC_METADATA_ADDR, gets the token through its metadata client and its gRPC auth plugin.
2. `yc-iam-sidecar token` talks to a fake IAM built from the SDK's generated protobuf stubs, which
   verifies the JWT with `cryptography` (RSASSA-PSS, SHA-256, salt length 32) and the key file's
   public key, and checks the header and claims IAM requires.

Usage: scripts/sdk_compat.py BINARY  (needs `pip install yandexcloud`). Prints 'N passed, N failed'.
"""

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from google.protobuf.timestamp_pb2 import Timestamp
from yandex.cloud.iam.v1 import iam_token_service_pb2 as pb
from yandex.cloud.iam.v1 import iam_token_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
KEY_FILE = ROOT / "tests" / "fixtures" / "sa-key-rsa2048.json"
AUDIENCE = "https://iam.api.cloud.yandex.net/iam/v1/tokens"

results = {"passed": 0, "failed": 0}


def check(name, condition, detail=""):
    if condition:
        results["passed"] += 1
        print(f"ok   {name}")
    else:
        results["failed"] += 1
        print(f"FAIL {name} {detail}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return None, ""


def sdk_reads_the_metadata_endpoint(binary):
    port = free_port()
    proc = subprocess.Popen(
        [binary, "dev", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 20
        while time.time() < deadline and http_get(f"http://127.0.0.1:{port}/readyz")[0] != 200:
            time.sleep(0.05)
        os.environ["YC_METADATA_ADDR"] = f"127.0.0.1:{port}"
        from yandexcloud._auth_fabric import MetadataAuth, get_auth_token_requester
        from yandexcloud._auth_plugin import Credentials

        requester = get_auth_token_requester()
        check("SDK picks MetadataAuth from YC_METADATA_ADDR", isinstance(requester, MetadataAuth))
        token = requester.get_token()
        _, direct = http_get(f"http://127.0.0.1:{port}/token")
        check("SDK metadata client gets the served token", token == direct and token.startswith("t1."), token[:12])

        # The SDK's gRPC auth plugin, as it runs before every API call.
        got = {}

        class Context:
            service_url = "https://compute.api.cloud.yandex.net/yandex.cloud.compute.v1.InstanceService"
            method_name = "List"

        def callback(metadata, error):
            got["metadata"], got["error"] = metadata, error

        Credentials(requester, lambda: None)(Context(), callback)
        check(
            "SDK auth plugin sends Authorization: Bearer <token>",
            got.get("error") is None and dict(got.get("metadata") or ()).get("authorization") == f"Bearer {direct}",
            repr(got.get("error")),
        )
    finally:
        proc.terminate()
        code = proc.wait(timeout=10)
    check("sidecar exits 0 on SIGTERM", code == 0, f"exit {code}")


class VerifyingIam(pb_grpc.IamTokenServiceServicer):
    """Create as IAM does it, with an independent JWT verifier."""

    def __init__(self, key):
        self.key = key
        self.public = serialization.load_pem_public_key(key["public_key"].encode())
        self.seen = []

    def Create(self, request, context):
        jwt = request.jwt
        header_b64, claims_b64, signature_b64 = jwt.split(".")

        def unb64(part):
            return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

        header = json.loads(unb64(header_b64))
        claims = json.loads(unb64(claims_b64))
        try:
            self.public.verify(
                unb64(signature_b64),
                f"{header_b64}.{claims_b64}".encode(),
                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                hashes.SHA256(),
            )
            signature_ok = True
        except Exception:  # noqa: BLE001
            signature_ok = False
        self.seen.append((header, claims, signature_ok, request.WhichOneof("identity")))
        if not signature_ok:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "JWT signature validation fails")
        expires = Timestamp()
        expires.FromSeconds(int(time.time()) + 3600)
        return pb.CreateIamTokenResponse(iam_token="t1.python-verified", expires_at=expires)


def jwt_verifies_with_an_independent_implementation(binary):
    key = json.loads(KEY_FILE.read_text())
    iam = VerifyingIam(key)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_IamTokenServiceServicer_to_server(iam, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        out = subprocess.run(
            [binary, "token", "--iam-endpoint", f"http://127.0.0.1:{port}", "--key-file", str(KEY_FILE)],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("YC_")},
        )
    finally:
        server.stop(None)
    check("token command succeeds against the SDK-stub IAM", out.returncode == 0, out.stderr.strip())
    check("token printed", out.stdout.strip() == "t1.python-verified", out.stdout)
    if not iam.seen:
        check("IAM saw a request", False)
        return
    header, claims, signature_ok, identity = iam.seen[0]
    now = time.time()
    check("identity oneof is jwt", identity == "jwt", identity)
    check("PS256 signature with 32-byte salt verifies (cryptography)", signature_ok)
    check("header is typ JWT, alg PS256, kid", header == {"typ": "JWT", "alg": "PS256", "kid": key["id"]}, header)
    check("iss is the service account", claims.get("iss") == key["service_account_id"], claims)
    check("aud is the IAM tokens URL", claims.get("aud") == AUDIENCE, claims)
    check("iat is now", abs(claims.get("iat", 0) - now) < 30, claims)
    check("exp - iat is at most one hour", 0 < claims.get("exp", 0) - claims.get("iat", 0) <= 3600, claims)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    binary = os.path.abspath(sys.argv[1])
    sdk_reads_the_metadata_endpoint(binary)
    jwt_verifies_with_an_independent_implementation(binary)
    print(f"sdk-compat: {results['passed']} passed, {results['failed']} failed")
    sys.exit(1 if results["failed"] else 0)


if __name__ == "__main__":
    main()
