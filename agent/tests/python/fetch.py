"""Fetches this process's X509-SVID from a Workload API socket with Python clients.

Usage: python3 fetch.py SOCKET_PATH

Prints one line per client, "<client> <version>: <SPIFFE ID>":
  - grpcio: bare grpcio with stubs generated now by grpcio-tools from sidecar/proto/workloadapi.proto
    (into a temporary directory, nothing generated is committed);
  - py-spiffe: spiffe.WorkloadApiClient, when the `spiffe` package is installed.

Exit status 3 with "MISSING <module>" on stderr when grpcio or grpcio-tools is not installed,
1 on any other failure.
"""

import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile

PROTO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto", "workloadapi.proto")


def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def with_grpcio(socket_path):
    import grpc
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="workloadapi-stubs-")
    proto_dir = os.path.dirname(os.path.abspath(PROTO))
    # grpc_tools ships the well-known types (google/protobuf/struct.proto).
    wkt = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{wkt}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.abspath(PROTO),
        ]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc})")
    sys.path.insert(0, out)
    pb = importlib.import_module("workloadapi_pb2")
    pb_grpc = importlib.import_module("workloadapi_pb2_grpc")

    from cryptography import x509

    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        stub = pb_grpc.SpiffeWorkloadAPIStub(channel)
        stream = stub.FetchX509SVID(
            pb.X509SVIDRequest(), metadata=[("workload.spiffe.io", "true")], timeout=20
        )
        first = next(iter(stream))
        stream.cancel()
    svid = first.svids[0]
    # The ID the agent says, and the one in the certificate: they must agree.
    cert = x509.load_der_x509_certificate(svid.x509_svid[: der_len(svid.x509_svid)])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [svid.spiffe_id]:
        raise RuntimeError(f"certificate URI SAN {uris} != spiffe_id {svid.spiffe_id}")
    return svid.spiffe_id


def der_len(data):
    """Length of the first DER element (x509_svid is concatenated DER certificates)."""
    if data[1] < 0x80:
        return 2 + data[1]
    n = data[1] & 0x7F
    return 2 + n + int.from_bytes(data[2 : 2 + n], "big")


def with_py_spiffe(socket_path):
    from spiffe import WorkloadApiClient

    with WorkloadApiClient(socket_path=f"unix://{socket_path}") as client:
        return str(client.fetch_x509_svid(timeout=20).spiffe_id)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--py-spiffe":
        print(with_py_spiffe(sys.argv[2]))
        return 0
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    socket_path = sys.argv[1]
    for module in ("grpc", "grpc_tools", "cryptography"):
        try:
            importlib.import_module(module)
        except ImportError:
            print(f"MISSING {module}", file=sys.stderr)
            return 3
    print(f"grpcio {version('grpcio')}: {with_grpcio(socket_path)}", flush=True)
    if importlib.util.find_spec("spiffe") is None:
        print("py-spiffe not installed: skipped", file=sys.stderr)
        return 0
    # py-spiffe registers the same package-less messages (X509SVIDRequest, ...) in protobuf's
    # default pool as the stubs above: it runs in a process of its own.
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--py-spiffe", socket_path],
        stdout=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    if child.returncode != 0:
        raise RuntimeError(f"py-spiffe client failed ({child.returncode})")
    print(f"py-spiffe {version('spiffe')}: {child.stdout.strip()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
