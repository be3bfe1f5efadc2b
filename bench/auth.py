"""What auth costs on the gateway hop, side by side in one run: a gateway without
--auth-config, with an API key (SHA-256 and a constant-time compare per call), and with a
JWT (RS256, verified once and then remembered), each in front of its own worker. Identity
model, `infermesh bench` unary at concurrency 1 and 32; req/s, p50 and the gateway's CPU
per 1,000 requests. Release builds; run through bench/auth.sh.

BENCH_OLD_BIN=<dir with an older infermesh-worker and infermesh-gateway> adds the same
no-auth and API-key setups on those binaries, side by side with the new ones (its auth
file in the format that build reads)."""
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from hops import compare, echo_repo  # noqa: E402

KEY = "bench-api-key-0123456789abcdef"


def main() -> None:
    import hashlib

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    d = echo_repo("infermesh-auth-bench-")
    rsa_key = rsa.generate_private_key(65537, 2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    (d / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k", "alg": "RS256", "use": "sig"}]}))
    (d / "auth.yaml").write_text(f"""tenants:
  - name: bench
    keys: ["sha256:{hashlib.sha256(KEY.encode()).hexdigest()}"]
    subjects: ["system:serviceaccount:bench:client"]
    scopes: [infer, read]
    models: ["*"]
    limits: {{}}
""")
    now = int(time.time())
    token = jwt.encode({"sub": "system:serviceaccount:bench:client", "aud": "infermesh", "iss": "bench",
                        "exp": now + 3600}, rsa_key, algorithm="RS256", headers={"kid": "k"})
    auth = ["--auth-config", str(d / "auth.yaml")]
    setups = {
        "no auth": ([], [], [], "127.0.0.1"),
        "API key": ([], auth, ["--token", KEY], "127.0.0.1"),
        "JWT (RS256)": ([], auth + ["--auth-jwks", str(d / "jwks.json"), "--auth-jwt-audience", "infermesh",
                                    "--auth-jwt-issuer", "bench"], ["--token", token], "127.0.0.1"),
    }
    old = os.environ.get("BENCH_OLD_BIN")
    if old:
        # Before `models` and `limits` were required: absent meant all and none.
        (d / "auth-old.yaml").write_text(f"""tenants:
  - name: bench
    keys: ["sha256:{hashlib.sha256(KEY.encode()).hexdigest()}"]
    scopes: [infer, read]
""")
        setups["no auth, before"] = ([], [], [], "127.0.0.1", old)
        setups["API key, before"] = ([], ["--auth-config", str(d / "auth-old.yaml")], ["--token", KEY],
                                     "127.0.0.1", old)
    compare(d, setups, "gateway", worker_cpu=False)


if __name__ == "__main__":
    main()
