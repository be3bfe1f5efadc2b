"""What auth costs on the gateway hop, side by side in one run: a gateway without
--auth-config, with an API key (SHA-256 and a constant-time compare per call), and with a
JWT (an RS256 signature verified per call), each in front of its own worker. Identity
model, `infermesh bench` unary at concurrency 1 and 32; req/s, p50 and the gateway's CPU
per 1,000 requests. Release builds; run through bench/auth.sh."""
import json
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from gateway import BIN, SECONDS, free_port  # noqa: E402
from tls import best_of, echo_repo, healthy  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
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
""")
    now = int(time.time())
    token = jwt.encode({"sub": "system:serviceaccount:bench:client", "aud": "infermesh", "iss": "bench",
                        "exp": now + 3600}, rsa_key, algorithm="RS256", headers={"kid": "k"})
    auth = ["--auth-config", str(d / "auth.yaml")]
    setups = {
        "no auth": ([], []),
        "API key": (auth, ["--token", KEY]),
        "JWT (RS256)": (auth + ["--auth-jwks", str(d / "jwks.json"), "--auth-jwt-audience", "infermesh",
                                "--auth-jwt-issuer", "bench"], ["--token", token]),
    }
    procs, running = [], {}

    def start(cmd):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    common = ["--grpc-address", "127.0.0.1", "--health-address", "127.0.0.1", "--allow-metrics", "false",
              "--threads", "1", "--shutdown-grace", "0s"]
    try:
        for name, (flags, client) in setups.items():
            wport, whealth, gport, ghealth = free_port(), free_port(), free_port(), free_port()
            w = start([str(BIN / "infermesh-worker"), "--model-repository", str(d), "--grpc-port", str(wport),
                       "--health-port", str(whealth), "--intra-op-threads", "1", *common])
            healthy(whealth)
            g = start([str(BIN / "infermesh-gateway"), "--workers", f"127.0.0.1:{wport}", "--grpc-port", str(gport),
                       "--health-port", str(ghealth), *common, *flags])
            healthy(ghealth)
            running[name] = (f"127.0.0.1:{gport}", client, [g.pid, w.pid])
        results = best_of(running, ROUNDS)
        print(f"Identity model, `infermesh bench` unary over one connection, {SECONDS:g} s per run, best of "
              f"{ROUNDS} interleaved rounds; CPU in ms per 1,000 requests.\n")
        print("| gateway | concurrency | req/s | vs no auth | p50 ms | gateway CPU | vs no auth |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for c in (1, 32):
            base = results[("no auth", c)]
            for name in setups:
                r = results[(name, c)]
                gw = r["cpu_ms_per_1k"][0]
                print(f"| {name} | {c} | {r['requests_per_s']:.0f} | {r['requests_per_s'] / base['requests_per_s']:.2f}× | "
                      f"{r['p50_ms']:.3f} | {gw:.0f} | {gw / base['cpu_ms_per_1k'][0]:.2f}× |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


if __name__ == "__main__":
    main()
