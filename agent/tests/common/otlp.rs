//! An OTLP/HTTP receiver for tests: accepts `POST /v1/traces` with a protobuf body, decodes it
//! with the OpenTelemetry protocol's own message types, and keeps every span.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value::Value,
};
use prost::Message as _;

/// A received span: its name, ids (hex; the parent's empty for a root) and attributes as
/// strings.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub name: String,
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attributes: BTreeMap<String, String>,
}

/// The receiver; spans accumulate for the life of the test.
pub struct Receiver {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind OTLP receiver");
        let addr = listener.local_addr().expect("addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (s, e) = (spans.clone(), errors.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (s, e) = (s.clone(), e.clone());
                std::thread::spawn(move || {
                    if let Err(err) = serve(conn, &s) {
                        e.lock().expect("lock").push(err);
                    }
                });
            }
        });
        Self {
            addr,
            spans,
            errors,
        }
    }

    /// The endpoint to put in `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("lock").clone()
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("lock").clone()
    }
}

/// Serves requests on one (keep-alive) connection until the peer closes it.
fn serve(conn: TcpStream, spans: &Mutex<Vec<ReceivedSpan>>) -> Result<(), String> {
    let mut reader = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
    let mut out = conn;
    loop {
        let mut request_line = String::new();
        if reader
            .read_line(&mut request_line)
            .map_err(|e| e.to_string())?
            == 0
        {
            return Ok(());
        }
        let mut content_length = None;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).map_err(|e| e.to_string())?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').unwrap_or((line, ""));
            match k.to_ascii_lowercase().as_str() {
                "content-length" => content_length = v.trim().parse::<usize>().ok(),
                "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
                _ => {}
            }
        }
        let body = if chunked {
            read_chunked(&mut reader)?
        } else {
            let mut body = vec![0; content_length.unwrap_or(0)];
            reader.read_exact(&mut body).map_err(|e| e.to_string())?;
            body
        };
        if !request_line.starts_with("POST /v1/traces ") {
            return Err(format!("unexpected request {request_line:?}"));
        }
        let req = ExportTraceServiceRequest::decode(body.as_slice())
            .map_err(|e| format!("decoding ExportTraceServiceRequest: {e}"))?;
        spans.lock().expect("lock").extend(flatten(&req));
        // An empty body is a valid, empty ExportTraceServiceResponse.
        out.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n",
        )
        .map_err(|e| e.to_string())?;
    }
}

fn read_chunked(reader: &mut impl std::io::BufRead) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk).map_err(|e| e.to_string())?;
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&chunk[..size]);
    }
}

fn flatten(req: &ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in &req.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .and_then(|kv| kv.value.as_ref())
            .map(|v| value_string(v.value.as_ref()))
            .unwrap_or_default();
        for ss in &rs.scope_spans {
            for span in &ss.spans {
                let attributes = span
                    .attributes
                    .iter()
                    .map(|kv| {
                        (
                            kv.key.clone(),
                            value_string(kv.value.as_ref().and_then(|v| v.value.as_ref())),
                        )
                    })
                    .collect();
                out.push(ReceivedSpan {
                    name: span.name.clone(),
                    service: service.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes,
                });
            }
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn value_string(v: Option<&Value>) -> String {
    match v {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}
