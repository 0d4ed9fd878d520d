//! The pods of this node from the API server: a kube-rs watcher with the field selector
//! `spec.nodeName=<node>`, each pod reduced to a [`PodView`] and sent to the event loop.
//! Outside a cluster (no kubeconfig, no service account) it says so once and looks again now
//! and then; an API server that cannot be reached is retried with kube's backoff. Either way
//! `nodewarden_kubernetes_api_up` says whether the source is in use.

use std::{collections::BTreeMap, time::Duration};

use futures_util::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{Container, ContainerStatus, Pod, ResourceRequirements},
    apimachinery::pkg::api::resource::Quantity,
};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::mpsc::Sender;

use crate::model::pods::{BadQuantity, ContainerView, Kind, Limits, PodChange, PodView, quantity};

/// How often a node outside a cluster looks for one again.
const LOOK_AGAIN: Duration = Duration::from_secs(60);
/// Pods of one list kept at most (kubelet's default is 110 per node).
const MAX_LISTED: usize = 4096;

/// Why a pod could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BadPod {
    #[error("the pod has no {0}")]
    Missing(&'static str),
    #[error("{field}: {source}")]
    Quantity { field: String, source: BadQuantity },
}

/// This node's name: `configured`, else `$NODE_NAME` (the downward API), else the host name.
#[must_use]
pub fn node_name(configured: &str) -> Option<String> {
    let some = |s: String| {
        let s = s.trim().to_owned();
        (!s.is_empty()).then_some(s)
    };
    some(configured.to_owned())
        .or_else(|| std::env::var("NODE_NAME").ok().and_then(some))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .and_then(some)
        })
}

/// Watches the pods of `node` until the event loop stops listening. `config` is kube's
/// client configuration; `None` infers it (kubeconfig, else the service account) and, where
/// there is none, looks again every minute.
pub async fn run(
    config: Option<kube::Config>,
    node: String,
    tx: Sender<PodChange>,
    up: prometheus::IntGauge,
) {
    up.set(0);
    let mut told = false;
    let config = match config {
        Some(c) => c,
        None => loop {
            match kube::Config::infer().await {
                Ok(c) => break c,
                Err(e) => {
                    if !told {
                        tracing::info!(
                            "Kubernetes API: not used (no kubeconfig or service account: {e}); desired limits come from the rules, trusted writers and what was first seen, names from kubelet's directories"
                        );
                        told = true;
                    }
                    if sleep_or_closed(&tx, LOOK_AGAIN).await {
                        return;
                    }
                }
            }
        },
    };
    let client = match Client::try_from(config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("Kubernetes API: not used: the client cannot be built: {e}");
            return;
        }
    };
    tracing::info!(node, "Kubernetes API: watching the pods of this node");
    watch(client, &node, &tx, &up).await;
    up.set(0);
}

/// Sleeps `d`; `true` if the event loop stopped listening meanwhile.
async fn sleep_or_closed(tx: &Sender<PodChange>, d: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = tx.closed() => true,
    }
}

/// The watch proper: lists (buffered until complete), then changes as they come.
async fn watch(client: Client, node: &str, tx: &Sender<PodChange>, up: &prometheus::IntGauge) {
    let api: Api<Pod> = Api::all(client);
    let selector = format!("spec.nodeName={node}");
    let stream = watcher(api, watcher::Config::default().fields(&selector)).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut listed: Vec<PodView> = Vec::new();
    let mut failing = false;
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            () = tx.closed() => return,
        };
        let Some(event) = event else { return };
        let change = match event {
            Ok(watcher::Event::Init) => {
                listed.clear();
                None
            }
            Ok(watcher::Event::InitApply(pod)) => {
                if listed.len() < MAX_LISTED {
                    listed.extend(usable(&pod));
                } else {
                    tracing::warn!(
                        "Kubernetes API: more than {MAX_LISTED} pods on this node; the rest are left out"
                    );
                }
                None
            }
            Ok(watcher::Event::InitDone) => Some(PodChange::Listed(std::mem::take(&mut listed))),
            Ok(watcher::Event::Apply(pod)) => usable(&pod).map(PodChange::Applied),
            Ok(watcher::Event::Delete(pod)) => {
                pod.metadata.uid.map(|uid| PodChange::Deleted { uid })
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("Kubernetes API: unreachable, retrying: {e}");
                    failing = true;
                }
                up.set(0);
                continue;
            }
        };
        if failing {
            tracing::info!("Kubernetes API: reachable again");
            failing = false;
        }
        if let Some(change) = change {
            if matches!(change, PodChange::Listed(_)) {
                up.set(1);
            }
            if tx.send(change).await.is_err() {
                return;
            }
        }
    }
}

/// The pod's view, or a warning and nothing (its cgroups fall back to the other sources).
fn usable(pod: &Pod) -> Option<PodView> {
    match view(pod) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(
                pod = pod.metadata.name.as_deref().unwrap_or("?"),
                "Kubernetes API: pod left out: {e}"
            );
            None
        }
    }
}

/// What the agent needs of a pod.
pub fn view(pod: &Pod) -> Result<PodView, BadPod> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref().ok_or(BadPod::Missing("spec"))?;
    let status = pod.status.clone().unwrap_or_default();
    let statuses: Vec<&ContainerStatus> = status
        .container_statuses
        .iter()
        .chain(status.init_container_statuses.iter())
        .flatten()
        .collect();
    let container = |kind: Kind, c: &Container| -> Result<(Kind, ContainerView), BadPod> {
        let st = statuses.iter().find(|s| s.name == c.name);
        let field = |what: &str| format!("container {}: {what}", c.name);
        Ok((
            kind,
            ContainerView {
                name: c.name.clone(),
                id: st
                    .and_then(|s| s.container_id.as_deref())
                    .map(|id| id.split_once("://").map_or(id, |(_, id)| id).to_owned()),
                spec: limits(c.resources.as_ref(), &field("resources.limits"))?,
                status: match st.and_then(|s| s.resources.as_ref()) {
                    Some(r) => Some(limits(Some(r), &field("status resources.limits"))?),
                    None => None,
                },
            },
        ))
    };
    let mut containers = Vec::new();
    for c in &spec.containers {
        containers.push(container(Kind::Regular, c)?);
    }
    for c in spec.init_containers.iter().flatten() {
        let kind = if c.restart_policy.as_deref() == Some("Always") {
            Kind::Sidecar
        } else {
            Kind::Init
        };
        containers.push(container(kind, c)?);
    }
    let resizing = status.resize.as_deref().is_some_and(|r| !r.is_empty())
        || status.conditions.iter().flatten().any(|c| {
            matches!(c.type_.as_str(), "PodResizePending" | "PodResizeInProgress")
                && c.status == "True"
        });
    Ok(PodView {
        uid: meta.uid.clone().ok_or(BadPod::Missing("uid"))?,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().ok_or(BadPod::Missing("name"))?,
        containers,
        overhead: of_map(spec.overhead.as_ref(), "spec.overhead")?,
        pod_limits: limits(spec.resources.as_ref(), "spec.resources.limits")?,
        resizing,
    })
}

fn limits(r: Option<&ResourceRequirements>, field: &str) -> Result<Limits, BadPod> {
    of_map(r.and_then(|r| r.limits.as_ref()), field)
}

fn of_map(map: Option<&BTreeMap<String, Quantity>>, field: &str) -> Result<Limits, BadPod> {
    let get = |name: &str, scale: u64| {
        map.and_then(|m| m.get(name))
            .map(|q| quantity(&q.0, scale))
            .transpose()
            .map_err(|source| BadPod::Quantity {
                field: format!("{field}.{name}"),
                source,
            })
    };
    Ok(Limits {
        memory: get("memory", 1)?,
        cpu_milli: get("cpu", 1000)?,
    })
}

#[cfg(test)]
mod tests;
