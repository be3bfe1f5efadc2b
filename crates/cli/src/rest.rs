//! The client commands (`infer`, `models`, `health`) over KServe v2 HTTP/REST, for a URL
//! that names a server's HTTP port. They speak HTTP/2 over the same connection the gRPC
//! client uses (infermesh's HTTP port takes HTTP/2 in cleartext and over TLS), so TLS,
//! client certificates and the bearer token are the same.

use anyhow::{bail, Context};
use bytes::{BufMut, Bytes, BytesMut};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::conn::Conn;

/// Which protocol a client command speaks to `--url`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC, or HTTP/REST when the server answers gRPC with plain HTTP (the URL names an
    /// HTTP port).
    #[default]
    Auto,
    Grpc,
    Http,
}

#[derive(clap::Args, Clone, Debug, Default)]
pub struct ProtocolArg {
    /// The protocol to speak: auto tries gRPC and turns to KServe v2 HTTP/REST when the
    /// port answers in plain HTTP (e.g. --url http://localhost:8000).
    #[arg(long, env = "INFERMESH_PROTOCOL", value_enum, default_value_t)]
    pub protocol: Protocol,
}

impl ProtocolArg {
    /// Runs `grpc` or `http` as the protocol says; `auto` runs `grpc`, and `http` when the
    /// server answered in plain HTTP.
    pub async fn either<T>(
        &self,
        conn: &Conn,
        grpc: impl std::future::Future<Output = anyhow::Result<T>>,
        http: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        match self.protocol {
            Protocol::Grpc => grpc.await.map_err(|e| match conn.answered_http() {
                true => e.context(
                    "the server answered in plain HTTP: the URL names an HTTP/REST port (try --protocol http)",
                ),
                false => e,
            }),
            Protocol::Http => http.await,
            Protocol::Auto => match grpc.await {
                Err(_) if conn.answered_http() => http.await,
                done => done,
            },
        }
    }
}

/// One HTTP exchange: the answer's status, headers and body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The answer as an error for `what`: its status and the server's `error` text.
    pub fn failure(&self, what: &str) -> anyhow::Error {
        let said = serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned());
        anyhow::anyhow!("{what}: HTTP {}: {said}", self.status)
    }

    fn json(&self, what: &str) -> anyhow::Result<Value> {
        if !self.status.is_success() {
            return Err(self.failure(what));
        }
        serde_json::from_slice(&self.body)
            .with_context(|| format!("{what}: the answer is not JSON"))
    }
}

pub async fn send(
    conn: &Conn,
    method: Method,
    path: &str,
    headers: &[(&'static str, String)],
    body: Bytes,
) -> anyhow::Result<Answer> {
    let mut req = http::Request::builder().method(method).uri(path);
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let req = req
        .body(tonic::body::Body::new(http_body_util::Full::new(body)))
        .with_context(|| format!("building the request for {path}"))?;
    let resp = tower::ServiceExt::oneshot(conn.clone(), req)
        .await
        .with_context(|| format!("HTTP {path}"))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the answer to {path}: {e}"))?
        .to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// A path segment with everything but unreserved characters percent-encoded.
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn model_path(model: &str, version: &str) -> String {
    match version {
        "" => format!("/v2/models/{}", segment(model)),
        v => format!("/v2/models/{}/versions/{}", segment(model), segment(v)),
    }
}

/// A tensor's name, datatype and shape, as model metadata lists them (the gRPC message).
pub use infermesh_proto::model_metadata_response::TensorMetadata as Described;

/// The model's inputs from `GET /v2/models/{m}[/versions/{v}]`.
pub async fn inputs(conn: &Conn, model: &str, version: &str) -> anyhow::Result<Vec<Described>> {
    let answer = send(
        conn,
        Method::GET,
        &model_path(model, version),
        &[],
        Bytes::new(),
    )
    .await?;
    let meta = answer.json("model metadata")?;
    meta.get("inputs")
        .and_then(Value::as_array)
        .context("model metadata: no 'inputs' list")?
        .iter()
        .map(described)
        .collect()
}

fn described(v: &Value) -> anyhow::Result<Described> {
    let text = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .with_context(|| format!("tensor {v}: no '{k}'"))
    };
    let shape = v
        .get("shape")
        .and_then(Value::as_array)
        .with_context(|| format!("tensor {v}: no 'shape'"))?
        .iter()
        .map(|d| {
            d.as_i64()
                .with_context(|| format!("tensor {v}: a dim is not an integer"))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Described {
        name: text("name")?,
        datatype: text("datatype")?,
        shape,
    })
}

/// A tensor ready to send: its datatype, shape and raw bytes.
pub struct Prepared {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub raw: Bytes,
}

/// `POST .../infer` with every input and output in Triton's binary tensor data extension,
/// so the bytes are exactly what the gRPC path sends and gets. Returns each output's
/// name, datatype, shape and raw bytes.
pub async fn infer(
    conn: &Conn,
    model: &str,
    version: &str,
    inputs: Vec<Prepared>,
) -> anyhow::Result<Vec<Prepared>> {
    let header = json!({
        "inputs": inputs.iter().map(|i| json!({
            "name": i.name,
            "datatype": i.datatype,
            "shape": i.shape,
            "parameters": {"binary_data_size": i.raw.len()},
        })).collect::<Vec<_>>(),
        "parameters": {"binary_data_output": true},
    })
    .to_string();
    let mut body = BytesMut::from(header.as_bytes());
    for i in &inputs {
        body.put_slice(&i.raw);
    }
    let answer = send(
        conn,
        Method::POST,
        &format!("{}/infer", model_path(model, version)),
        &[
            ("inference-header-content-length", header.len().to_string()),
            ("content-type", "application/octet-stream".into()),
        ],
        body.freeze(),
    )
    .await?;
    if !answer.status.is_success() {
        return Err(answer.failure("inference failed"));
    }
    outputs(&answer)
}

/// The outputs of an inference answer: a JSON header and the binary outputs after it, or
/// JSON alone.
fn outputs(answer: &Answer) -> anyhow::Result<Vec<Prepared>> {
    let header_len = match answer.headers.get("inference-header-content-length") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n <= answer.body.len())
            .context("the answer's Inference-Header-Content-Length is not a length within it")?,
        None => answer.body.len(),
    };
    let header: Value = serde_json::from_slice(&answer.body[..header_len])
        .context("the inference answer is not JSON")?;
    let mut rest = answer.body.slice(header_len..);
    let mut out = Vec::new();
    for o in header
        .get("outputs")
        .and_then(Value::as_array)
        .context("the inference answer has no 'outputs' list")?
    {
        let d = described(o)?;
        let binary = o
            .pointer("/parameters/binary_data_size")
            .and_then(Value::as_u64);
        let raw = match (binary, o.get("data")) {
            (Some(n), _) => {
                let n = usize::try_from(n)
                    .ok()
                    .filter(|&n| n <= rest.len())
                    .with_context(|| {
                        format!("output '{}': binary_data_size past the answer", d.name)
                    })?;
                rest.split_to(n)
            }
            (None, Some(data)) => {
                let datatype = infermesh_core::DataType::parse(&d.datatype)
                    .with_context(|| format!("unknown datatype {}", d.datatype))?;
                crate::json::encode(&d.name, datatype, data)?.1
            }
            (None, None) => bail!("output '{}' has neither data nor binary data", d.name),
        };
        out.push(Prepared {
            name: d.name,
            datatype: d.datatype,
            shape: d.shape,
            raw,
        });
    }
    Ok(out)
}

/// `POST /v2/repository/index`: the models as JSON objects, and a gateway's worker lines.
pub async fn index(conn: &Conn) -> anyhow::Result<(Vec<Value>, Vec<String>)> {
    let answer = send(
        conn,
        Method::POST,
        "/v2/repository/index",
        &[("content-type", "application/json".into())],
        Bytes::from_static(b"{}"),
    )
    .await?;
    let models = match answer.json("repository index")? {
        Value::Array(items) => items,
        other => bail!("repository index: expected a list, found {other}"),
    };
    let workers = answer
        .headers
        .get_all("infermesh-worker")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    Ok((models, workers))
}

/// Server or model health: `""` is `/v2/health/ready`, `liveness` `/v2/health/live`, a
/// model name its `/v2/models/{m}/ready`. True when ready (200), false when not (400).
pub async fn ready(conn: &Conn, service: &str) -> anyhow::Result<bool> {
    let path = match service {
        "" => "/v2/health/ready".to_string(),
        "liveness" => "/v2/health/live".to_string(),
        model => format!("{}/ready", model_path(model, "")),
    };
    let answer = send(conn, Method::GET, &path, &[], Bytes::new()).await?;
    match answer.status {
        StatusCode::OK => Ok(true),
        // Not ready; for a model, also one the server does not have (as Triton answers).
        StatusCode::BAD_REQUEST => Ok(false),
        _ => Err(answer.failure("health check failed")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(super::segment("mlp"), "mlp");
        assert_eq!(super::segment("a b/c"), "a%20b%2Fc");
    }
}
