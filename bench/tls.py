"""What TLS costs on the gateway hop, side by side in one run: client → gateway → worker
in plaintext, with TLS on both hops, and with mTLS on both hops (the production shape).
Identity model (no model cost, so the TLS work is what differs), `infermesh bench` unary at
concurrency 1 and 32 over one connection; req/s, p50, and CPU per 1,000 requests of the
gateway and of the worker. Certificates are made here (ECDSA P-256, as cert-manager's in
deploy/overlays/production-tls). Release builds; run through bench/tls.sh.

BENCH_OLD_BIN=<dir with an older infermesh-worker and infermesh-gateway> adds the
plaintext and mTLS setups on those binaries, side by side with the new ones."""
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "python"))

from hops import compare, echo_repo  # noqa: E402
from pki import Ca  # noqa: E402


def main() -> None:
    d = echo_repo("infermesh-tls-bench-")
    ca = Ca(d, "ca")
    s_cert, s_key = (str(p) for p in ca.leaf("server", ["localhost", "127.0.0.1"], 1))
    g_cert, g_key = (str(p) for p in ca.leaf("gateway", ["gateway.infermesh.test"], 2))
    c_cert, c_key = (str(p) for p in ca.leaf("client", ["client.infermesh.test"], 3))
    serve = ["--grpc-server-cert", s_cert, "--grpc-server-key", s_key]
    mutual = ["--grpc-use-ssl-mutual", "--grpc-root-cert", str(ca.cert)]
    ca_flags = ["--worker-tls-ca", str(ca.cert), "--worker-tls-server-name", "localhost"]
    # The workers' certificate is for localhost; the gateway dials them by IP.
    setups = {
        "plaintext": ([], [], [], "127.0.0.1"),
        "TLS both hops": (serve, serve + ca_flags, ["--ca", str(ca.cert)], "https://localhost"),
        "mTLS both hops": (
            serve + mutual + ["--grpc-allowed-client-names", "gateway.infermesh.test"],
            serve + mutual + ca_flags + ["--worker-tls-cert", g_cert, "--worker-tls-key", g_key],
            ["--ca", str(ca.cert), "--cert", c_cert, "--key", c_key],
            "https://localhost",
        ),
    }
    old = os.environ.get("BENCH_OLD_BIN")
    if old:
        setups["plaintext, before"] = (*setups["plaintext"], old)
        setups["mTLS both hops, before"] = (*setups["mTLS both hops"], old)
    compare(d, setups, "hops", worker_cpu=True)


if __name__ == "__main__":
    main()
