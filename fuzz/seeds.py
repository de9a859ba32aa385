#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets into fuzz/seeds/<target>/ (then minimized into
fuzz/corpus/<target>/ with `cargo fuzz cmin`, see README.md). Real inputs of each parser: CSRs
(P-256, P-384, Ed25519, RSA), signed tokens (the test key of fuzz/src/lib.rs), JWKS, bundles
(PEM, DER, SPIFFE JSON), AdmissionReviews, header blocks captured from Python grpcio,
ClientHellos captured from OpenSSL, tunnel and policy files, iptables-save output.
Needs python3 with `cryptography` and `grpcio`, and `openssl`."""
import base64, datetime, json, os, socket, subprocess, sys, threading, time
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, utils
from cryptography.x509.oid import NameOID

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "seeds")
KEY_B64 = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgEB8eIFtardfCri9vZTlw6YOLjvj6w8ftODuuRlgTCtahRANCAASZ//Gv0+t4ONWslREz5Bi2uGdbR3D+yE146vvVFsBjDrIuDyRhWGpy50VkZ7JM5ZyZ4uB1Vc5AAO5CQsKAMgM/"
KEY = serialization.load_der_private_key(base64.b64decode(KEY_B64), None)
EXPECTED = "spiffe://example.org/ns/default/sa/web"
NOW = 1_800_000_000


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt(header, claims):
    signing = b64u(json.dumps(header).encode()) + "." + b64u(json.dumps(claims).encode())
    der = KEY.sign(signing.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = utils.decode_dss_signature(der)
    return signing + "." + b64u(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def csrs():
    keys = {
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "rsa2048": rsa.generate_private_key(65537, 2048),
        "rsa1024": rsa.generate_private_key(65537, 1024),
    }
    for name, key in keys.items():
        algo = None if name == "ed25519" else hashes.SHA256()
        variants = {
            "ok": [x509.SubjectAlternativeName([x509.UniformResourceIdentifier(EXPECTED)])],
            "dns": [x509.SubjectAlternativeName([x509.DNSName("web.example.org")])],
            "ca": [x509.BasicConstraints(ca=True, path_length=None)],
            "other_id": [x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org/admin")])],
            "usage": [x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                      x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH])],
        }
        for v, exts in variants.items():
            if name != "p256" and v not in ("ok",):
                continue
            b = x509.CertificateSigningRequestBuilder().subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")]))
            for e in exts:
                b = b.add_extension(e, critical=False)
            csr = b.sign(key, algo)
            put("csr", f"{name}_{v}.der", csr.public_bytes(serialization.Encoding.DER))
            if v == "ok":
                put("csr", f"{name}_{v}.pem", csr.public_bytes(serialization.Encoding.PEM))


def tokens():
    binding = {"namespace": "default", "serviceaccount": {"name": "web", "uid": "u1"},
               "pod": {"name": "web-1", "uid": "u2"}}
    iss = "https://kubernetes.default.svc.cluster.local"
    k8s = {"iss": iss, "aud": ["kith-ca"], "exp": NOW + 3600, "iat": NOW - 60, "nbf": NOW - 60,
           "sub": "system:serviceaccount:default:web", "kubernetes.io": binding}
    put("k8s_token", "ok", jwt({"alg": "ES256", "kid": "fuzz-key"}, k8s))
    put("k8s_token", "no_kid", jwt({"alg": "ES256"}, k8s))
    put("k8s_token", "expired", jwt({"alg": "ES256", "kid": "fuzz-key"}, dict(k8s, exp=NOW - 3600)))
    put("k8s_token", "rs256", jwt({"alg": "RS256", "kid": "fuzz-key"}, k8s))
    put("k8s_token", "legacy", jwt({"alg": "ES256", "kid": "fuzz-key"},
                                   {"iss": "kubernetes/serviceaccount", "sub": "system:serviceaccount:default:web"}))
    svid = {"sub": EXPECTED, "aud": ["kith-fuzz"], "exp": NOW + 300, "iat": NOW - 1}
    put("jwt_svid", "ok", jwt({"alg": "ES256", "kid": "fuzz-key", "typ": "JWT"}, svid))
    put("jwt_svid", "aud_str", jwt({"alg": "ES256", "kid": "fuzz-key"}, dict(svid, aud="kith-fuzz")))
    put("jwt_svid", "expired", jwt({"alg": "ES256", "kid": "fuzz-key"}, dict(svid, exp=NOW - 1)))
    put("jwt_svid", "none", b64u(b'{"alg":"none"}') + "." + b64u(json.dumps(svid).encode()) + ".")

    pub = KEY.public_key().public_numbers()
    x, y = b64u(pub.x.to_bytes(32, "big")), b64u(pub.y.to_bytes(32, "big"))
    r = rsa.generate_private_key(65537, 2048).public_key().public_numbers()
    n, e = b64u(r.n.to_bytes(256, "big")), b64u(r.e.to_bytes(3, "big"))
    put("k8s_jwks", "ec", json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": "fuzz-key", "use": "sig", "alg": "ES256"}]}))
    put("k8s_jwks", "rsa", json.dumps({"keys": [{"kty": "RSA", "n": n, "e": e, "kid": "r1", "use": "sig", "alg": "RS256"}]}))
    put("k8s_jwks", "mixed", json.dumps({"keys": [{"kty": "oct", "k": "AAAA"}, {"kty": "EC", "crv": "P-384", "x": x, "y": y},
                                                  {"kty": "RSA", "n": n, "e": e}, {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": "k2"}]}))
    return x, y


def bundles(x, y):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "example.org")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org")]), critical=False)
            .sign(key, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    put("bundle", "root.pem", pem)
    put("bundle", "root.der", der)
    pn = key.public_key().public_numbers()
    doc = {"spiffe_sequence": 3, "spiffe_refresh_hint": 300, "keys": [
        {"use": "x509-svid", "kty": "EC", "crv": "P-256", "x": b64u(pn.x.to_bytes(32, "big")),
         "y": b64u(pn.y.to_bytes(32, "big")), "x5c": [base64.b64encode(der).decode()]},
        {"use": "jwt-svid", "kty": "EC", "crv": "P-256", "kid": "fuzz-key", "x": x, "y": y}]}
    put("bundle", "spiffe.json", json.dumps(doc, indent=1))


def reviews():
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "generateName": "web-7d9c-", "namespace": "shop",
        "labels": {"app": "web", "kith.dev/inject": "enabled"},
        "annotations": {"kith.dev/exclude-outbound-ports": "5432", "kith.dev/exclude-outbound-cidrs": "10.1.0.0/16"}},
        "spec": {"serviceAccountName": "web", "containers": [
            {"name": "web", "image": "web:1", "ports": [{"name": "http", "containerPort": 8080}],
             "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}}}]}}
    def req(op, obj, kind=None):
        return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": kind or {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": op, "object": obj, "dryRun": False}})
    put("admission_review", "create", req("CREATE", pod))
    put("admission_review", "update", req("UPDATE", pod))
    put("admission_review", "deployment", req("CREATE", {}, {"group": "apps", "version": "v1", "kind": "Deployment"}))
    off = json.loads(json.dumps(pod)); off["metadata"]["labels"]["kith.dev/inject"] = "disabled"
    put("admission_review", "disabled", req("CREATE", off))


def capture_h2(name, client):
    """The bytes an HTTP/2 client sends to a unix socket server that answers only SETTINGS:
    preface, SETTINGS, and the request's header block. `client(path)` dials the socket."""
    path = f"/tmp/kith-fuzz-seed-{os.getpid()}.sock"
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    got = bytearray()
    def serve():
        c, _ = srv.accept()
        c.settimeout(1.0)
        try:
            c.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # SETTINGS
            while len(got) < 4096:
                b = c.recv(65536)
                if not b:
                    break
                got.extend(b)
        except OSError:
            pass
        c.close()
    t = threading.Thread(target=serve); t.start()
    try:
        client(path)
    except Exception as e:  # the server never answers: every client ends in an error
        print(f"{name}: {type(e).__name__} (expected)", file=sys.stderr)
    t.join(); srv.close(); os.unlink(path)
    if not got.startswith(b"PRI * HTTP/2.0"):
        sys.exit(f"{name}: no HTTP/2 preface captured")
    # First byte: reads of 255 bytes, no preface added (the capture has it); then byte by byte.
    put("authority_shim", name, b"\xff" + bytes(got))
    put("authority_shim", name + "_bytewise", b"\x00" + bytes(got))


def grpcio_client(path):
    """Python grpcio (C-core): `:authority` is the percent-encoded socket path."""
    import grpc
    ch = grpc.insecure_channel(f"unix://{path}")
    try:
        ch.unary_unary("/SpiffeWorkloadAPI/FetchJWTSVID")(
            b"\x12\x03aud", timeout=1.5, metadata=[("workload.spiffe.io", "true")])
    finally:
        ch.close()


def tonic_client(path):
    """kith's own Workload API client (tonic and h2, the stack of the Rust `spiffe` crate)."""
    kith = os.path.join(HERE, "..", "target", "debug", "kith")
    subprocess.run([kith, "agent", "fetch", "--socket", path, "--write-dir", f"{path}.out"],
                   timeout=10, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def curl_client(path):
    """curl (nghttp2: Huffman-coded literals)."""
    subprocess.run(["curl", "-s", "-m", "1.5", "--http2-prior-knowledge", "--unix-socket", path,
                    "http://localhost/SpiffeWorkloadAPI/FetchX509SVID"], timeout=10)


def capture_client_hello(name, args):
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
    port = srv.getsockname()[1]
    p = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c, _ = srv.accept(); c.settimeout(2.0)
    data = c.recv(65536)
    c.close(); srv.close(); p.kill(); p.wait()
    put("first_bytes", name, data)


def files():
    put("tunnel_config", "example.toml", """[[tunnel]]
name = "db"
listen = "127.0.0.1:5432"
connect = "10.0.0.2:8443"
expect_id = "spiffe://example.org/db"

[[tunnel]]
listen = "0.0.0.0:8443"
forward = "127.0.0.1:8080"
allow = ["spiffe://example.org/ns/shop/*", "spiffe://example.org/ns/x/sa/y@80+443"]

[[tunnel]]
name = "any"
listen = "[::1]:9000"
connect = "db.example.org:8443"
expect_trust_domain = true
""")
    put("policy", "example.toml", """[[allow]]
id = "spiffe://example.org/ns/shop/sa/web"
ports = [8080]

[[allow]]
id = "spiffe://example.org/ns/monitoring/*"
""")
    put("policy", "flags", "spiffe://example.org/ns/shop/sa/web\nspiffe://example.org/ns/a/*@80+443\n")
    put("iptables_save", "nat", """# Generated by iptables-save v1.8.9 (nf_tables) on Mon Dec  7 05:00:00 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KITH_OUTPUT - [0:0]
-A OUTPUT -p tcp -j KITH_OUTPUT
-A KITH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A KITH_OUTPUT -d 127.0.0.0/8 -j RETURN
-A KITH_OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
# Completed on Mon Dec  7 05:00:00 2026
""")
    put("iptables_save", "if_inet6", "00000000000000000000000000000001 01 80 10 80       lo\n"
        "fe80000000000000b0c1d2fffee3f4a5 02 40 20 80     eth0\n"
        "fd000000000000000000000000000002 02 40 00 40     eth0\n")
    for i, s in enumerate(["spiffe://example.org/ns/default/sa/web", "spiffe://example.org",
                           "spiffe://td_1.x-y/A.b_c-d/e", "spiffe://Example.org/x", "spiffe://a/b/../c",
                           "spiffe://a/b/", "spiffe://a:80/b", "spiffe://u@a/b", "spiffe://a/b?c#d",
                           "spiffe://a/%41", "example.org", "http://example.org/x"]):
        put("spiffe_id", f"s{i}", s)


def main():
    csrs()
    x, y = tokens()
    bundles(x, y)
    reviews()
    files()
    capture_client_hello("tls13_kith", ["-alpn", "kith/1", "-tls1_3"])
    capture_client_hello("tls13_h2", ["-alpn", "h2,http/1.1", "-servername", "web.example.org"])
    capture_client_hello("tls12", ["-tls1_2"])
    put("first_bytes", "plaintext", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    capture_h2("grpcio", grpcio_client)
    capture_h2("curl", curl_client)
    if os.path.exists(os.path.join(HERE, "..", "target", "debug", "kith")):
        capture_h2("tonic", tonic_client)


if __name__ == "__main__":
    main()
