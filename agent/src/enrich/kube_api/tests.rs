//! The Kubernetes source against a local stand-in API server: no cluster can run here, so a
//! small HTTP server serves real Pod JSON (as `kubectl get pod -o json` prints it) over the
//! API's list and watch, and kube-rs's watcher talks to it as to an API server.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_common::LimitFile;
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::*;

const CART: &str = include_str!("../../../tests/fixtures/kubernetes/pod-cart.json");
const SEARCH: &str = include_str!("../../../tests/fixtures/kubernetes/pod-search-resizing.json");
const CART_UID: &str = "3f9a1c2e-7b4d-4e8f-9a0b-1c2d3e4f5a6b";
const SEARCH_UID: &str = "a41c7e2b-9d3f-4b6a-8e1c-5f2d7a9b3c60";
const CART_ID: &str = "9c1e4b7a2d5f8e3c6b9a0d1f4e7c2b5a8d3f6e9c1b4a7d0e3f6c9b2a5d8e1f4a";

fn pod(json: &str) -> Pod {
    serde_json::from_str(json).expect("a fixture pod")
}

/// The cart pod being resized to 4Gi: pending, kubelet has not applied it yet.
fn cart_resize_pending() -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(CART).expect("json");
    v["metadata"]["resourceVersion"] = "48400".into();
    v["spec"]["containers"][0]["resources"]["limits"]["memory"] = "4Gi".into();
    v["status"]["conditions"]
        .as_array_mut()
        .expect("conditions")
        .push(serde_json::json!({
            "lastProbeTime": null, "lastTransitionTime": "2026-11-27T10:00:00Z",
            "reason": "Deferred", "message": "Node didn't have enough resource: memory",
            "status": "True", "type": "PodResizePending"
        }));
    v
}

#[test]
fn a_pod_as_the_agent_needs_it() {
    let cart = view(&pod(CART)).expect("usable");
    assert_eq!(
        cart,
        PodView {
            uid: CART_UID.into(),
            namespace: "shop".into(),
            name: "cart-7d9c5b6f4-x2v8q".into(),
            containers: vec![(
                Kind::Regular,
                ContainerView {
                    name: "app".into(),
                    id: Some(CART_ID.into()),
                    spec: Limits {
                        memory: Some(2 << 30),
                        cpu_milli: Some(500)
                    },
                    status: Some(Limits {
                        memory: Some(2 << 30),
                        cpu_milli: Some(500)
                    }),
                },
            )],
            overhead: Limits::default(),
            pod_limits: Limits::default(),
            resizing: false,
        }
    );
    let search = view(&pod(SEARCH)).expect("usable");
    assert!(search.resizing, "PodResizeInProgress");
    assert_eq!(
        search
            .containers
            .iter()
            .map(|(k, c)| (
                *k,
                c.name.as_str(),
                c.spec.memory,
                c.status.and_then(|s| s.memory)
            ))
            .collect::<Vec<_>>(),
        [
            (Kind::Regular, "search", Some(3 << 30), Some(2 << 30)),
            (Kind::Sidecar, "proxy", Some(128 << 20), Some(128 << 20)),
        ]
    );
    let pending: Pod = serde_json::from_value(cart_resize_pending()).expect("a pod");
    assert!(view(&pending).expect("usable").resizing, "PodResizePending");

    let mut bad: serde_json::Value = serde_json::from_str(CART).expect("json");
    bad["spec"]["containers"][0]["resources"]["limits"]["memory"] = "2Gb".into();
    let bad: Pod = serde_json::from_value(bad).expect("a pod");
    let e = view(&bad).expect_err("not a quantity").to_string();
    assert!(
        e.contains("container app: resources.limits.memory") && e.contains("2Gb"),
        "{e}"
    );
}

/// What the stand-in serves, and the requests it got.
struct StandIn {
    list: String,
    watch: Vec<String>,
    requests: Mutex<Vec<String>>,
}

impl StandIn {
    /// Serves on `listener` until the test ends.
    async fn serve(self: Arc<Self>, listener: TcpListener) {
        let mut watches = 0;
        while let Ok((sock, _)) = listener.accept().await {
            let Some(target) = request_target(&sock).await else {
                continue;
            };
            self.requests
                .lock()
                .expect("not poisoned")
                .push(target.clone());
            let me = self.clone();
            let first_watch = target.contains("watch=true") && {
                watches += 1;
                watches == 1
            };
            tokio::spawn(async move { me.answer(sock, &target, first_watch).await });
        }
    }

    async fn answer(&self, mut sock: TcpStream, target: &str, first_watch: bool) {
        if !target.contains("watch=true") {
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                self.list.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(self.list.as_bytes()).await;
            return;
        }
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
        let _ = sock.write_all(head.as_bytes()).await;
        if first_watch {
            for event in &self.watch {
                let line = format!("{event}\n");
                let chunk = format!("{:x}\r\n{line}\r\n", line.len());
                let _ = sock.write_all(chunk.as_bytes()).await;
            }
        }
        // A watch stays open, as the API server's does.
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// The request line's target, once the request's head is read.
async fn request_target(sock: &TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        sock.readable().await.ok()?;
        match sock.try_read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return None,
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&head);
    text.split_whitespace().nth(1).map(str::to_owned)
}

async fn next(rx: &mut mpsc::Receiver<PodChange>) -> PodChange {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("a change within 20 s")
        .expect("the watcher runs")
}

#[tokio::test(flavor = "current_thread")]
async fn the_pods_of_this_node_from_a_stand_in_api_server() {
    let list = format!(
        r#"{{"apiVersion":"v1","kind":"PodList","metadata":{{"resourceVersion":"48380"}},"items":[{CART},{SEARCH}]}}"#
    );
    let mut gone: serde_json::Value = serde_json::from_str(SEARCH).expect("json");
    gone["metadata"]["resourceVersion"] = "48401".into();
    let watch = vec![
        serde_json::json!({"type": "MODIFIED", "object": cart_resize_pending()}).to_string(),
        serde_json::json!({"type": "DELETED", "object": gone}).to_string(),
    ];
    let stand_in = Arc::new(StandIn {
        list,
        watch,
        requests: Mutex::new(Vec::new()),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let url = format!("http://{}", listener.local_addr().expect("bound"));
    tokio::spawn(stand_in.clone().serve(listener));

    let (tx, mut rx) = mpsc::channel(16);
    let up = prometheus::IntGauge::new("up", "up").expect("a gauge");
    let config = kube::Config::new(url.parse().expect("a URL"));
    let task = tokio::spawn(run(Some(config), "node-a".into(), tx, up.clone()));

    let PodChange::Listed(pods) = next(&mut rx).await else {
        panic!("a list first");
    };
    assert_eq!(
        pods.iter().map(|p| p.uid.as_str()).collect::<Vec<_>>(),
        [CART_UID, SEARCH_UID]
    );
    assert_eq!(up.get(), 1, "listed: the source is up");
    let PodChange::Applied(cart) = next(&mut rx).await else {
        panic!("the resize");
    };
    assert!(cart.resizing);
    let d = cart
        .desired(Some(CART_ID), LimitFile::MemoryMax, 4096)
        .expect("a limit");
    assert_eq!(
        (d.value, d.also),
        (
            crate::model::limit::LimitValue::Bytes(4 << 30),
            Some(crate::model::limit::LimitValue::Bytes(2 << 30))
        ),
        "the new value, and the one still applied"
    );
    assert_eq!(
        next(&mut rx).await,
        PodChange::Deleted {
            uid: SEARCH_UID.into()
        }
    );
    let requests = stand_in.requests.lock().expect("not poisoned").clone();
    assert!(requests.len() >= 2, "{requests:?}");
    for r in &requests[..2] {
        assert!(
            r.starts_with("/api/v1/pods?") && r.contains("fieldSelector=spec.nodeName%3Dnode-a"),
            "only this node's pods are asked for: {r}"
        );
    }
    assert!(requests[1].contains("watch=true") && requests[1].contains("resourceVersion=48380"));

    drop(rx);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the watcher ends with the event loop")
        .expect("no panic");
    assert_eq!(up.get(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn an_unreachable_api_server_is_retried_and_said_down() {
    // Nothing listens there. HTTPS, as in a cluster: the TLS client is built (kube's rustls
    // with ring) before the first connection fails.
    let free = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let url = format!("https://{}", free.local_addr().expect("bound"));
    drop(free);
    let (tx, rx) = mpsc::channel(16);
    let up = prometheus::IntGauge::new("up", "up").expect("a gauge");
    up.set(1);
    let config = kube::Config::new(url.parse().expect("a URL"));
    let task = tokio::spawn(run(Some(config), "node-a".into(), tx, up.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(up.get(), 0);
    assert!(!task.is_finished(), "it keeps retrying");
    drop(rx);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the watcher ends with the event loop")
        .expect("no panic");
}

#[test]
fn the_node_name_configured_else_from_the_environment() {
    assert_eq!(node_name(" node-a ").as_deref(), Some("node-a"));
    // Without configuration: $NODE_NAME or the host name; some name either way here.
    assert!(node_name("").is_some_and(|n| !n.is_empty()));
}
