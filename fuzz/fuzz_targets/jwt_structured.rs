//! Structure-aware JWTs: arbitrary header and claims, serialized as JSON and signed with the
//! test key (so the signature holds and the claim checks are reached), into both real
//! verifiers: the JWT-SVID verifier (`identity::jwt::verify_jwt_svid`, the agent's
//! ValidateJWTSVID) and the Kubernetes token verifier (`K8sVerifier::verify`, the CA's pod
//! attestation). Properties: what either accepts has the algorithm, key, audience, issuer and
//! lifetime it must have.
#![no_main]

use std::sync::LazyLock;

use arbitrary::Arbitrary;
use ca::k8s::{K8sConfig, K8sVerifier};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

static K8S: LazyLock<K8sVerifier> = LazyLock::new(|| {
    let mut config = K8sConfig::new(kith_fuzz::K8S_ISSUER);
    config.audience = kith_fuzz::AUDIENCE.to_owned();
    K8sVerifier::from_jwks(config, &kith_fuzz::K8S_JWKS).expect("fixture jwks loads")
});

/// A JSON value the input shapes, with the useful ones made likely.
#[derive(Arbitrary, Debug)]
enum Val {
    Missing,
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Arr(Vec<String>),
    Obj(Vec<(String, String)>),
}

impl Val {
    fn put(&self, map: &mut Map<String, Value>, key: &str) {
        let v = match self {
            Val::Missing => return,
            Val::Null => Value::Null,
            Val::Bool(b) => json!(b),
            Val::Int(i) => json!(i),
            Val::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Val::Str(s) => json!(s),
            Val::Arr(a) => json!(a),
            Val::Obj(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), json!(v))).collect()),
        };
        map.insert(key.to_owned(), v);
    }
}

#[derive(Arbitrary, Debug)]
enum Field<T> {
    Good(T),
    Other(Val),
}

#[derive(Arbitrary, Debug)]
enum Time {
    /// Seconds from the verification time.
    Relative(i32),
    Other(Val),
}

#[derive(Arbitrary, Debug)]
struct Binding {
    namespace: Field<()>,
    sa_name: Field<()>,
    sa_uid: Val,
    pod_name: Val,
    pod_uid: Val,
}

#[derive(Arbitrary, Debug)]
struct Input {
    alg: Field<bool>,
    kid: Field<()>,
    typ: Val,
    crit: bool,
    extra_header: Vec<(String, Val)>,
    sub: Field<String>,
    aud: Field<bool>,
    iss: Field<()>,
    exp: Time,
    nbf: Time,
    iat: Time,
    binding: Option<Binding>,
    extra_claims: Vec<(String, Val)>,
    /// Claims that are not the JSON built above.
    raw_claims: Option<Vec<u8>>,
}

fn time(t: &Time, map: &mut Map<String, Value>, key: &str, now: i64) {
    match t {
        Time::Relative(d) => {
            map.insert(key.to_owned(), json!(now + i64::from(*d)));
        }
        Time::Other(v) => v.put(map, key),
    }
}

fuzz_target!(|input: Input| {
    let now = 1_800_000_000i64;
    let mut header = Map::new();
    for (k, v) in input.extra_header.iter().take(4) {
        v.put(&mut header, k);
    }
    match &input.alg {
        Field::Good(true) => drop(header.insert("alg".into(), json!("ES256"))),
        Field::Good(false) => drop(header.insert("alg".into(), json!("RS256"))),
        Field::Other(v) => v.put(&mut header, "alg"),
    }
    match &input.kid {
        Field::Good(()) => drop(header.insert("kid".into(), json!(kith_fuzz::KEY_ID))),
        Field::Other(v) => v.put(&mut header, "kid"),
    }
    input.typ.put(&mut header, "typ");
    if input.crit {
        header.insert("crit".into(), json!(["exp"]));
    }

    let mut claims = Map::new();
    for (k, v) in input.extra_claims.iter().take(4) {
        v.put(&mut claims, k);
    }
    match &input.sub {
        Field::Good(path) => {
            drop(claims.insert("sub".into(), json!(format!("spiffe://example.org/{path}"))))
        }
        Field::Other(v) => v.put(&mut claims, "sub"),
    }
    match &input.aud {
        Field::Good(false) => drop(claims.insert("aud".into(), json!(kith_fuzz::AUDIENCE))),
        Field::Good(true) => drop(claims.insert("aud".into(), json!(["x", kith_fuzz::AUDIENCE]))),
        Field::Other(v) => v.put(&mut claims, "aud"),
    }
    match &input.iss {
        Field::Good(()) => drop(claims.insert("iss".into(), json!(kith_fuzz::K8S_ISSUER))),
        Field::Other(v) => v.put(&mut claims, "iss"),
    }
    time(&input.exp, &mut claims, "exp", now);
    time(&input.nbf, &mut claims, "nbf", now);
    time(&input.iat, &mut claims, "iat", now);
    if let Some(b) = &input.binding {
        let mut ns = Map::new();
        match &b.namespace {
            Field::Good(()) => drop(ns.insert("namespace".into(), json!("default"))),
            Field::Other(v) => v.put(&mut ns, "namespace"),
        }
        let mut sa = Map::new();
        match &b.sa_name {
            Field::Good(()) => drop(sa.insert("name".into(), json!("web"))),
            Field::Other(v) => v.put(&mut sa, "name"),
        }
        b.sa_uid.put(&mut sa, "uid");
        let mut pod = Map::new();
        b.pod_name.put(&mut pod, "name");
        b.pod_uid.put(&mut pod, "uid");
        ns.insert("serviceaccount".into(), Value::Object(sa));
        ns.insert("pod".into(), Value::Object(pod));
        claims.insert("kubernetes.io".into(), Value::Object(ns));
    }

    let header_json = serde_json::to_vec(&header).expect("header serializes");
    let claims_json = match &input.raw_claims {
        Some(raw) => raw.clone(),
        None => serde_json::to_vec(&claims).expect("claims serialize"),
    };
    let token = kith_fuzz::sign_jwt(&header_json, &claims_json);
    // What was signed: the raw claims, when the input gave some.
    let signed: Map<String, Value> = serde_json::from_slice(&claims_json).unwrap_or_default();
    let now_secs = now as u64;
    // A time claim: absent (None), or present and then necessarily a non-negative integer.
    let time = |name: &str| {
        signed.get(name).map(|v| {
            v.as_u64()
                .unwrap_or_else(|| panic!("{name} {v} is not an integer, and was accepted"))
        })
    };

    let authorities = std::slice::from_ref(&*kith_fuzz::AUTHORITY);
    if let Ok(svid) =
        identity::jwt::verify_jwt_svid(&token, authorities, kith_fuzz::AUDIENCE, kith_fuzz::now())
    {
        assert_eq!(header.get("alg"), Some(&json!("ES256")));
        assert_eq!(header.get("kid"), Some(&json!(kith_fuzz::KEY_ID)));
        assert!(!header.contains_key("crit"));
        assert!(matches!(
            header.get("typ").and_then(Value::as_str),
            None | Some("JWT" | "JOSE")
        ));
        assert!(matches!(header.get("typ"), None | Some(Value::String(_))));
        assert!(svid.aud.iter().any(|a| a == kith_fuzz::AUDIENCE));
        assert!(
            svid.exp > kith_fuzz::now(),
            "an expired JWT-SVID was accepted"
        );
        // The times are checked against the clock given, with no leeway, integers only.
        assert!(time("exp").is_some_and(|exp| exp > now_secs));
        assert!(time("nbf").is_none_or(|nbf| nbf <= now_secs));
        time("iat");
        assert_eq!(
            signed.get("sub").and_then(Value::as_str),
            Some(svid.sub.as_str()),
        );
    }
    if let Ok(pod) = K8S.verify(&token, kith_fuzz::now()) {
        assert!(matches!(
            header.get("alg").and_then(Value::as_str),
            Some("ES256")
        ));
        assert!(!header.contains_key("crit"));
        assert_eq!(signed.get("iss"), Some(&json!(kith_fuzz::K8S_ISSUER)));
        // The audience and the times, against the clock given, with the 30 s leeway.
        let aud = signed.get("aud");
        assert!(
            aud == Some(&json!(kith_fuzz::AUDIENCE))
                || aud
                    .and_then(Value::as_array)
                    .is_some_and(|a| a.contains(&json!(kith_fuzz::AUDIENCE))),
            "{aud:?}"
        );
        let leeway = 30;
        assert!(time("exp").is_some_and(|exp| exp.saturating_add(leeway) > now_secs));
        for name in ["nbf", "iat"] {
            assert!(time(name).is_none_or(|t| t <= now_secs + leeway), "{name}");
        }
        let binding = &signed["kubernetes.io"];
        assert_eq!(binding["namespace"], json!(pod.namespace));
        assert_eq!(binding["pod"]["uid"], json!(pod.pod_uid));
        let td = identity::TrustDomain::new("example.org").expect("valid trust domain");
        if let Ok(id) = pod.spiffe_id(&td) {
            assert!(id.is_member_of(&td));
            assert_eq!(id.segments().count(), 4, "{id}");
        }
    }
});
