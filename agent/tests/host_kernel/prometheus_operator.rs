//! deploy/kubernetes/prometheus-operator: the `PodMonitor` and `PrometheusRule`, rendered by
//! `kubectl kustomize`, parsed strictly into the fields of the Prometheus Operator's
//! `monitoring.coreos.com/v1` API that they use. No API server or operator runs here, and
//! k8s-openapi has no types for them: the types below stand in for the operator's CRD schemas,
//! with the same field names, and refuse any other field.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::kustomize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Object<S> {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: S,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitorSpec {
    job_label: String,
    selector: Selector,
    pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Selector {
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMetricsEndpoint {
    port: String,
    path: String,
    interval: String,
    scrape_timeout: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrometheusRuleSpec {
    groups: Vec<RuleGroup>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

/// The plain Prometheus rules file the `PrometheusRule` carries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    groups: Vec<RuleGroup>,
}

/// The pods' labels and their metrics port's name, from the base's `DaemonSet`.
fn daemonset_pods() -> (BTreeMap<String, String>, Vec<String>) {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/base");
    let text = kustomize(&base);
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let object = serde_json::Value::deserialize(doc).expect("YAML");
        if object["kind"] != "DaemonSet" {
            continue;
        }
        let ds: k8s_openapi::api::apps::v1::DaemonSet =
            serde_json::from_value(object).expect("DaemonSet");
        let template = ds.spec.expect("spec").template;
        let labels = template
            .metadata
            .and_then(|m| m.labels)
            .expect("pod labels");
        let ports = template.spec.expect("pod spec").containers[0]
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.clone())
            .collect();
        return (labels.into_iter().collect(), ports);
    }
    panic!("no DaemonSet in the base");
}

/// The `PodMonitor` scrapes the `DaemonSet`'s pods on their metrics port, with the job label the
/// alerts expect; the `PrometheusRule` carries the alert rules file's groups unchanged.
#[test]
#[ignore = "needs kubectl (Debian package kubernetes-client): run by `cargo xtask test`"]
fn prometheus_operator_objects_parse_strictly() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kubernetes/prometheus-operator");
    let text = kustomize(&dir);
    let (pod_labels, ports) = daemonset_pods();
    let alerts_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/prometheus/nodewarden-alerts.yaml");
    let alerts: RulesFile =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&alerts_path).expect("the alert rules"))
            .expect("the alert rules parse");
    let mut kinds = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let object = serde_json::Value::deserialize(doc).expect("YAML");
        let kind = object["kind"].as_str().expect("kind").to_owned();
        match kind.as_str() {
            "PodMonitor" => {
                let pm: Object<PodMonitorSpec> = serde_json::from_value(object.clone())
                    .unwrap_or_else(|e| panic!("PodMonitor: {e}: {object}"));
                check_meta(&pm.api_version, &pm.kind, &pm.metadata);
                for (key, value) in &pm.spec.selector.match_labels {
                    assert_eq!(pod_labels.get(key), Some(value), "the selector's {key}");
                }
                assert_eq!(
                    pod_labels.get(&pm.spec.job_label).map(String::as_str),
                    Some("nodewarden"),
                    "the job label is the pods' {}: the alerts say up{{job=\"nodewarden\"}}",
                    pm.spec.job_label
                );
                let [endpoint] = &pm.spec.pod_metrics_endpoints[..] else {
                    panic!("one endpoint: {:?}", pm.spec.pod_metrics_endpoints);
                };
                assert!(ports.contains(&endpoint.port), "{endpoint:?} in {ports:?}");
                assert_eq!(endpoint.path, "/metrics");
                eprintln!(
                    "PodMonitor: pods {:?}, port {}, every {} (timeout {})",
                    pm.spec.selector.match_labels,
                    endpoint.port,
                    endpoint.interval,
                    endpoint.scrape_timeout
                );
            }
            "PrometheusRule" => {
                let pr: Object<PrometheusRuleSpec> = serde_json::from_value(object.clone())
                    .unwrap_or_else(|e| panic!("PrometheusRule: {e}: {object}"));
                check_meta(&pr.api_version, &pr.kind, &pr.metadata);
                assert!(
                    pr.spec.groups == alerts.groups,
                    "the PrometheusRule's groups differ from {}: copy that file's groups under spec",
                    alerts_path.display()
                );
                let rules: usize = pr.spec.groups.iter().map(|g| g.rules.len()).sum();
                eprintln!("PrometheusRule: the alert rules file's {rules} rules");
            }
            other => panic!("{other} is of a kind this test does not check"),
        }
        kinds.push(kind);
    }
    kinds.sort();
    assert_eq!(kinds, ["PodMonitor", "PrometheusRule"]);
}

fn check_meta(api_version: &str, kind: &str, meta: &Metadata) {
    assert_eq!(api_version, "monitoring.coreos.com/v1", "{kind}");
    assert_eq!(meta.name, "nodewarden");
    assert_eq!(meta.namespace, "nodewarden");
    assert!(!meta.labels.is_empty());
}
