//! The CA decides every field of a certificate: a CSR's subject, extensions and wishes are
//! ignored or refused; TTLs are capped; renewals are covered in `renewal.rs`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use crate::common::{csr, csr_with, start_ca};
use rcgen::{DnType, KeyUsagePurpose};
use serde_json::json;
use x509_parser::prelude::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_csrs_key_is_used() {
    let ca = start_ca(|_| {}).await;
    let node = ca.node("host-a").await;
    // An entry asking for a week gets the policy's maximum (24 h here).
    ca.admin
        .call(
            hyper::Method::POST,
            "/entries",
            Some(
                json!({"spiffe_id": "spiffe://example.org/web", "parent_id": node.id,
            "selectors": ["unix:uid:1"], "ttl_seconds": 7 * 86_400, "dns": ["web.internal"]}),
            ),
        )
        .await
        .unwrap();
    let greedy = csr_with(|p| {
        p.distinguished_name.push(DnType::CommonName, "admin");
        p.distinguished_name.push(DnType::OrganizationName, "evil");
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    });
    let mut conn = ca.as_svid(&node).await;
    let before = SystemTime::now();
    let mut serials = Vec::new();
    for c in [greedy, csr().0] {
        let (s, v) = conn
            .post_json(
                "/v1/svid",
                &json!({"spiffe_id": "spiffe://example.org/web", "csr": c}),
            )
            .await
            .unwrap();
        assert_eq!(s, 200, "{v}");
        let chain = identity::pem::certificates(v["svid"].as_str().unwrap().as_bytes()).unwrap();
        let (_, cert) = parse_x509_certificate(&chain[0]).unwrap();
        assert_eq!(
            cert.subject().to_string(),
            "",
            "the CA sets an empty subject"
        );
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect();
        assert_eq!(
            sans,
            ["URI(spiffe://example.org/web)", "DNSName(web.internal)"],
            "SANs come from the entry"
        );
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!cert.is_ca());
        let nb = identity::x509::from_offset(cert.validity().not_before.to_datetime());
        let backdate = before.duration_since(nb).unwrap_or_default();
        assert!(
            backdate >= Duration::from_secs(28) && backdate <= Duration::from_secs(32),
            "{backdate:?}"
        );
        let life = cert
            .validity()
            .time_to_expiration()
            .unwrap()
            .whole_seconds();
        assert!(life <= 86_400 && life > 86_000, "capped at 24h: {life}");
        assert!(cert.raw_serial().len() >= 8, "at least 64 random bits");
        serials.push(cert.raw_serial().to_vec());
    }
    assert_ne!(serials[0], serials[1]);
}
