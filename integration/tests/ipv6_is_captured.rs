//! SECURITY: IPv6 is captured like IPv4. Pods get a unique-local address beside their
//! link-local one; an app in pod A reaches pod B's app over IPv6 through both sidecars (mTLS,
//! B logs A's ID), while plaintext IPv6 from outside the mesh (the node), to B's unique-local
//! and to its link-local address, is refused by B's STRICT inbound and counted
//! (plaintext_refused).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use integration::{Lab, Pod, connections, eventually, logged_peers, podapp};

const PORT: u16 = 8090;

fn ula(pod: &Pod) -> String {
    format!("fd00:77::{}", pod.ip.octets()[3])
}

/// B's link-local address on eth0, once out of duplicate address detection.
fn link_local(lab: &Lab, pod: &Pod) -> String {
    let mut addr = String::new();
    eventually(
        "a usable link-local address",
        Duration::from_secs(10),
        || {
            let out = lab.exec(
                &pod.ns,
                &[
                    "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link",
                ],
            );
            addr = out
                .split_whitespace()
                .skip_while(|w| *w != "inet6")
                .nth(1)
                .and_then(|a| a.split('/').next())
                .unwrap_or_default()
                .to_owned();
            !addr.is_empty() && !out.contains("tentative")
        },
    );
    addr
}

#[test]
fn ipv6_is_captured() {
    if !Lab::available("ipv6_is_captured") {
        return;
    }
    let mut lab = Lab::start("1h");
    let v6_mesh = ["--mesh-cidr", "fd00:77::/64"];
    let (a, a_sidecar) = lab.ready_pod("a", &v6_mesh);
    let (b, b_sidecar) = lab.ready_pod("b", &v6_mesh);
    lab.exec_node(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:77::1/64",
        "dev",
        "br0",
        "nodad",
    ]);
    for p in [&a, &b] {
        let addr = format!("{}/64", ula(p));
        lab.exec(
            &p.ns,
            &["ip", "-6", "addr", "add", &addr, "dev", "eth0", "nodad"],
        );
    }
    let app = lab.spawn_in(
        &b.ns,
        "b-v6",
        None,
        &[podapp(), "serve", &format!("[::]:{PORT}"), "b6"],
        &[],
    );
    lab.keep(app);
    let b6 = format!("[{}]:{PORT}", ula(&b));
    eventually("B's IPv6 app listens", Duration::from_secs(10), || {
        lab.exec_ok(&b.ns, &[podapp(), "get", &format!("[::1]:{PORT}"), "/"])
    });

    // Pod to pod over IPv6: captured on both sides, mTLS.
    let out = integration::run(&[
        "ip",
        "netns",
        "exec",
        &a.ns,
        podapp(),
        "get",
        &b6,
        "/",
        "over v6",
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("b6:over v6"),
        "{said}\na:\n{}\nb:\n{}",
        a_sidecar.log(),
        b_sidecar.log()
    );
    assert!(
        logged_peers(&b_sidecar.log(), "inbound").contains(&a.spiffe_id()),
        "B's sidecar saw A's SVID over IPv6:\n{}",
        b_sidecar.log()
    );

    // Plaintext IPv6 from outside the mesh: refused by STRICT, to both of B's addresses.
    let ll = link_local(&lab, &b);
    let br0: u32 = lab
        .exec_node(&["cat", "/sys/class/net/br0/ifindex"])
        .trim()
        .parse()
        .unwrap();
    for (n, to) in [b6.clone(), format!("[{ll}%{br0}]:{PORT}")]
        .iter()
        .enumerate()
    {
        let out = integration::run(&[
            "ip",
            "netns",
            "exec",
            &lab.node,
            podapp(),
            "get",
            to,
            "/",
            "plain",
        ]);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            !said.contains("b6:plain"),
            "plaintext IPv6 to {to} reached the app: {said}"
        );
        let m = lab.metrics(&b);
        assert_eq!(
            connections(&m, "inbound", "plaintext_refused"),
            (n + 1) as f64,
            "plaintext to {to} refused by the sidecar (not just unanswered):\n{m}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    lab.keep(a_sidecar);
    lab.keep(b_sidecar);
}
