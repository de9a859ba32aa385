//! The webhook's decision: an `admission.k8s.io/v1` AdmissionReview in, an AdmissionReview out
//! with the same uid and, when kith is injected, a JSONPatch (RFC 6902) from the pod the API
//! server sent to the injected one.
//!
//! The policy, for a `failurePolicy: Fail` webhook (see deploy/kubernetes/README.md):
//! - a body that is not an AdmissionReview gets an error ([`ReviewError`], HTTP 400), so the API
//!   server applies the failure policy;
//! - other kinds and operations than a Pod CREATE are allowed unchanged, with a message;
//! - a pod that opts out, is already injected or uses the host network is allowed unchanged;
//! - a pod that asked for kith but cannot get it (a bad annotation, a name already taken) is
//!   refused with the reason: it must not start outside the mesh it asked for.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::pod::{self, Outcome};
use crate::settings::Settings;

/// The largest request body read. The API server refuses objects over 1.5 MiB (etcd's limit)
/// and request bodies over 3 MiB, so a genuine review never comes near this.
pub const MAX_REVIEW_BYTES: usize = 3 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("not an AdmissionReview: {0}")]
    Malformed(String),
    #[error(
        "unsupported {0:?}: kith answers admission.k8s.io/v1 AdmissionReview (set admissionReviewVersions: [v1])"
    )]
    Version(String),
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error("the AdmissionReview request has no uid")]
    NoUid,
}

/// The answer, and what to log and count about it.
#[derive(Debug)]
pub struct Reviewed {
    /// The AdmissionReview to send back.
    pub body: Value,
    /// A metrics label: `injected`, a skip reason, `not_a_pod`, `not_create`, or `denied_<why>`.
    pub result: &'static str,
    /// `namespace/name` of the object, for the log.
    pub object: String,
    pub detail: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdmissionReview {
    api_version: String,
    kind: String,
    request: Option<AdmissionRequest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdmissionRequest {
    uid: String,
    kind: GroupVersionKind,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    operation: String,
    #[serde(default)]
    object: Option<Value>,
}

#[derive(Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    kind: String,
}

/// Reviews one AdmissionReview body.
pub fn review(body: &[u8], settings: &Settings) -> Result<Reviewed, ReviewError> {
    let review: AdmissionReview =
        serde_json::from_slice(body).map_err(|e| ReviewError::Malformed(e.to_string()))?;
    if review.api_version != "admission.k8s.io/v1" || review.kind != "AdmissionReview" {
        return Err(ReviewError::Version(format!(
            "{} {}",
            review.api_version, review.kind
        )));
    }
    let req = review.request.ok_or(ReviewError::NoRequest)?;
    if req.uid.is_empty() {
        return Err(ReviewError::NoUid);
    }
    let object = object_name(&req);
    let gvk = &req.kind;
    if (gvk.group.as_str(), gvk.version.as_str(), gvk.kind.as_str()) != ("", "v1", "Pod") {
        let what = format!("{}/{} {}", gvk.group, gvk.version, gvk.kind);
        let detail = format!("kith injects only v1 Pods; {what} passed unchanged");
        return Ok(allowed(
            &req.uid,
            None,
            &detail,
            Vec::new(),
            "not_a_pod",
            object,
        ));
    }
    if req.operation != "CREATE" {
        let detail = format!(
            "kith injects pods on CREATE only; {} passed unchanged",
            req.operation
        );
        return Ok(allowed(
            &req.uid,
            None,
            &detail,
            Vec::new(),
            "not_create",
            object,
        ));
    }
    Ok(review_pod(&req, settings, object))
}

fn review_pod(req: &AdmissionRequest, settings: &Settings, object: String) -> Reviewed {
    let Some(original) = req.object.as_ref().filter(|o| o.is_object()) else {
        return denied(
            &req.uid,
            "request.object is not a Pod",
            "malformed_pod",
            object,
        );
    };
    let mut pod: serde_norway::Value = match serde_json::from_value(original.clone()) {
        Ok(p) => p,
        Err(e) => {
            let msg = format!("request.object: {e}");
            return denied(&req.uid, &msg, "malformed_pod", object);
        }
    };
    match pod::inject(&mut pod, settings, true) {
        Ok(Outcome::Skipped(why)) => allowed(
            &req.uid,
            None,
            why.describe(),
            Vec::new(),
            why.label(),
            object,
        ),
        Ok(Outcome::Injected { warnings }) => match patch(original, &pod) {
            Ok(patch) => {
                let warnings = warnings.into_iter().map(|w| format!("kith: {w}")).collect();
                allowed(
                    &req.uid,
                    Some(patch),
                    "injected",
                    warnings,
                    "injected",
                    object,
                )
            }
            Err(e) => denied(&req.uid, &e, "patch_failed", object),
        },
        Err(e) => {
            let msg = format!("kith cannot inject this pod: {e}");
            denied(&req.uid, &msg, e.label(), object)
        }
    }
}

/// The JSONPatch from `original` to `injected`, base64 as AdmissionResponse.patch wants it.
fn patch(original: &Value, injected: &serde_norway::Value) -> Result<String, String> {
    let injected = serde_json::to_value(injected)
        .map_err(|e| format!("cannot turn the injected pod into JSON: {e}"))?;
    let ops = json_patch::diff(original, &injected);
    let bytes = serde_json::to_vec(&ops).map_err(|e| format!("cannot encode the patch: {e}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn allowed(
    uid: &str,
    patch: Option<String>,
    detail: &str,
    warnings: Vec<String>,
    result: &'static str,
    object: String,
) -> Reviewed {
    let mut response = json!({
        "uid": uid,
        "allowed": true,
        "status": {"code": 200, "message": detail},
    });
    if let Some(p) = patch {
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(p);
    }
    if !warnings.is_empty() {
        response["warnings"] = json!(warnings);
    }
    Reviewed {
        body: envelope(response),
        result,
        object,
        detail: detail.to_owned(),
    }
}

/// A refusal; `why` becomes the metrics label `denied_<why>`.
fn denied(uid: &str, message: &str, why: &'static str, object: String) -> Reviewed {
    let response = json!({
        "uid": uid,
        "allowed": false,
        "status": {"code": 400, "status": "Failure", "reason": "BadRequest", "message": message},
    });
    Reviewed {
        body: envelope(response),
        result: denied_label(why),
        object,
        detail: message.to_owned(),
    }
}

/// Metrics labels are `&'static str`: one per refusal reason.
fn denied_label(why: &str) -> &'static str {
    match why {
        "malformed_pod" => "denied_malformed_pod",
        "bad_annotation" => "denied_bad_annotation",
        "name_taken" => "denied_name_taken",
        "port_taken" => "denied_port_taken",
        "proxy_identity" => "denied_proxy_identity",
        "setid_capability" => "denied_setid_capability",
        "patch_failed" => "denied_patch_failed",
        _ => "denied_other",
    }
}

fn envelope(response: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    })
}

/// `namespace/name`; pods made by controllers have only a generateName at admission.
fn object_name(req: &AdmissionRequest) -> String {
    let meta = req.object.as_ref().and_then(|o| o.get("metadata"));
    let field = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str);
    let name = if req.name.is_empty() {
        field("name")
            .or(field("generateName"))
            .unwrap_or("(unnamed)")
    } else {
        &req.name
    };
    format!("{}/{name}", req.namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  generateName: web-7d9c-
  namespace: shop
  labels: {app: web, kith.dev/inject: enabled}
  annotations: {kith.dev/exclude-outbound-ports: "5432"}
spec:
  serviceAccountName: web
  containers:
  - name: web
    image: web:1
    ports: [{name: http, containerPort: 8080}]
    readinessProbe: {httpGet: {path: /healthz, port: http}}
"#;

    fn pod_json(yaml: &str) -> Value {
        serde_norway::from_str(yaml).unwrap()
    }

    fn request(kind: Value, operation: &str, object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": kind,
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": operation,
                "object": object,
                "dryRun": false,
            }
        }))
        .unwrap()
    }

    fn pod_request(object: Value) -> Vec<u8> {
        request(
            json!({"group": "", "version": "v1", "kind": "Pod"}),
            "CREATE",
            object,
        )
    }

    fn apply(pod: &Value, reviewed: &Reviewed) -> Value {
        let b64 = reviewed.body["response"]["patch"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let ops: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &ops).unwrap();
        patched
    }

    #[test]
    fn the_patch_turns_the_pod_into_the_offline_injection() {
        let pod = pod_json(POD);
        let reviewed = review(&pod_request(pod.clone()), &Settings::default()).unwrap();
        let response = &reviewed.body["response"];
        assert_eq!(reviewed.body["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(reviewed.body["kind"], "AdmissionReview");
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        assert_eq!(reviewed.result, "injected");
        assert_eq!(reviewed.object, "shop/web-7d9c-");

        let offline = crate::manifest::inject_manifests(POD, &Settings::default(), false).unwrap();
        let offline: Value = serde_norway::from_str(&offline.output).unwrap();
        assert_eq!(apply(&pod, &reviewed), offline);
    }

    #[test]
    fn a_pod_the_selectors_sent_without_a_label_is_injected() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "a"}]}});
        let reviewed = review(&pod_request(pod.clone()), &Settings::default()).unwrap();
        let patched = apply(&pod, &reviewed);
        assert_eq!(patched["spec"]["initContainers"][1]["name"], "kith-proxy");
        assert_eq!(
            patched["spec"]["containers"],
            json!([{"name": "a", "image": "a",
                    "securityContext": {"capabilities": {"drop": ["SETUID", "SETGID"]}}}])
        );
    }

    /// SECURITY: a pod whose app could be exempt from capture is refused with its reason.
    #[test]
    fn pods_that_could_escape_capture_are_denied_with_the_reason() {
        for (pod, label, says) in [
            (
                json!({"metadata": {"name": "p"}, "spec": {"containers": [
                    {"name": "a", "securityContext": {"runAsGroup": 1337}}]}}),
                "denied_proxy_identity",
                "runs as GID 1337",
            ),
            (
                json!({"metadata": {"name": "p"}, "spec": {"containers": [
                    {"name": "a", "securityContext": {"capabilities": {"add": ["SETUID"]}}}]}}),
                "denied_setid_capability",
                "adds the capability SETUID",
            ),
        ] {
            let reviewed = review(&pod_request(pod), &Settings::default()).unwrap();
            assert_eq!(reviewed.result, label);
            assert_eq!(reviewed.body["response"]["allowed"], false);
            let message = reviewed.body["response"]["status"]["message"]
                .as_str()
                .unwrap();
            assert!(message.contains(says), "{message}");
        }
    }

    #[test]
    fn pods_that_opt_out_or_are_injected_pass_unchanged() {
        let out = json!({"metadata": {"labels": {"kith.dev/inject": "disabled"}},
                         "spec": {"containers": [{"name": "a"}]}});
        let reviewed = review(&pod_request(out), &Settings::default()).unwrap();
        assert_eq!(reviewed.result, "opted_out");
        assert_eq!(reviewed.body["response"]["allowed"], true);
        assert!(reviewed.body["response"].get("patch").is_none());

        let pod = pod_json(POD);
        let once = apply(
            &pod,
            &review(&pod_request(pod.clone()), &Settings::default()).unwrap(),
        );
        let again = review(&pod_request(once), &Settings::default()).unwrap();
        assert_eq!(again.result, "already_injected");
        assert!(again.body["response"].get("patch").is_none());
    }

    #[test]
    fn other_kinds_and_operations_pass_unchanged_with_a_message() {
        let deploy = request(
            json!({"group": "apps", "version": "v1", "kind": "Deployment"}),
            "CREATE",
            json!({"metadata": {"name": "d"}}),
        );
        let reviewed = review(&deploy, &Settings::default()).unwrap();
        assert_eq!(reviewed.result, "not_a_pod");
        assert_eq!(reviewed.body["response"]["allowed"], true);
        assert!(reviewed.body["response"].get("patch").is_none());
        assert!(
            reviewed.body["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .contains("apps/v1 Deployment")
        );

        let update = request(
            json!({"group": "", "version": "v1", "kind": "Pod"}),
            "UPDATE",
            pod_json(POD),
        );
        let reviewed = review(&update, &Settings::default()).unwrap();
        assert_eq!(reviewed.result, "not_create");
        assert!(reviewed.body["response"].get("patch").is_none());
    }

    #[test]
    fn a_pod_that_asked_for_kith_but_cannot_have_it_is_refused_with_the_reason() {
        for (pod, expect, label) in [
            (
                json!({"metadata": {"annotations": {"kith.dev/exclude-inbound-ports": "http"}},
                       "spec": {"containers": [{"name": "a"}]}}),
                "kith.dev/exclude-inbound-ports",
                "denied_bad_annotation",
            ),
            (
                json!({"metadata": {}, "spec": {"containers": [{"name": "kith-proxy"}]}}),
                "named \"kith-proxy\"",
                "denied_name_taken",
            ),
            (
                json!({"metadata": {}, "spec": {"containers": "web"}}),
                "spec.containers",
                "denied_malformed_pod",
            ),
            (
                json!({"metadata": {}, "spec": []}),
                "spec is not a mapping",
                "denied_malformed_pod",
            ),
            (
                json!("a pod"),
                "request.object is not a Pod",
                "denied_malformed_pod",
            ),
        ] {
            let reviewed = review(&pod_request(pod), &Settings::default()).unwrap();
            let response = &reviewed.body["response"];
            assert_eq!(response["allowed"], false);
            assert_eq!(response["status"]["code"], 400);
            assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
            let msg = response["status"]["message"].as_str().unwrap();
            assert!(msg.contains(expect), "{msg}");
            assert_eq!(reviewed.result, label);
        }
    }

    #[test]
    fn bodies_that_are_not_admission_reviews_are_errors() {
        let v1beta1 = br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"u","kind":{"kind":"Pod"}}}"#;
        let cases: [(&[u8], &str); 7] = [
            (b"", "not an AdmissionReview"),
            (b"\xff\xfe garbage", "not an AdmissionReview"),
            (b"[1,2,3]", "not an AdmissionReview"),
            (b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\",\"request\":{\"uid\":", "not an AdmissionReview"),
            (v1beta1, "admissionReviewVersions: [v1]"),
            (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#, "has no request"),
            (
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"","kind":{"kind":"Pod"}}}"#,
                "has no uid",
            ),
        ];
        for (body, expect) in cases {
            let err = review(body, &Settings::default()).unwrap_err();
            assert!(err.to_string().contains(expect), "{err}");
        }
    }
}
