//! `infermesh models`: the repository index of a server, with states and reasons.

use infermesh_proto::{
    grpc_inference_service_client::GrpcInferenceServiceClient,
    repository_index_response::ModelIndex as Entry, RepositoryIndexRequest,
};

#[derive(clap::Args)]
pub struct ModelsArgs {
    /// Server address, e.g. localhost:8001, or an HTTP/REST port: http://localhost:8000.
    #[arg(long, env = "INFERMESH_URL", default_value = "localhost:8001")]
    pub url: String,
    #[command(flatten)]
    pub conn: crate::conn::ConnArgs,
    #[command(flatten)]
    pub protocol: crate::rest::ProtocolArg,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: ModelsArgs) -> anyhow::Result<()> {
    let conn = crate::conn::connect(&args.url, &args.conn).await?;
    let (index, workers) = args
        .protocol
        .either(&conn, grpc(conn.clone()), rest(&conn))
        .await?;
    if args.json {
        for m in &index {
            let v = serde_json::json!({"name": m.name, "version": m.version, "state": m.state, "reason": m.reason});
            println!("{v}");
        }
        for w in &workers {
            println!("{}", worker_json(w));
        }
        return Ok(());
    }
    let width = index.iter().map(|m| m.name.len()).max().unwrap_or(4).max(5);
    println!(
        "{:width$}  {:7}  {:11}  REASON",
        "MODEL", "VERSION", "STATE"
    );
    for m in &index {
        println!(
            "{:width$}  {:7}  {:11}  {}",
            m.name, m.version, m.state, m.reason
        );
    }
    if !workers.is_empty() {
        println!("\nWORKER STATE");
        for w in &workers {
            println!("{w}");
        }
    }
    Ok(())
}

/// The index, and a gateway's worker lines: it lists its workers' states beside the
/// index (a worker that is down has no models to show); a worker sends none.
async fn grpc(conn: crate::conn::Conn) -> anyhow::Result<(Vec<Entry>, Vec<String>)> {
    let answer = GrpcInferenceServiceClient::new(conn)
        .repository_index(RepositoryIndexRequest::default())
        .await
        .map_err(|s| anyhow::anyhow!("repository index: {}: {}", s.code(), s.message()))?;
    let workers: Vec<String> = answer
        .metadata()
        .get_all("infermesh-worker")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    Ok((answer.into_inner().models, workers))
}

async fn rest(conn: &crate::conn::Conn) -> anyhow::Result<(Vec<Entry>, Vec<String>)> {
    let (models, workers) = crate::rest::index(conn).await?;
    let text = |m: &serde_json::Value, k: &str| {
        m.get(k)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let entries = models
        .iter()
        .map(|m| Entry {
            name: text(m, "name"),
            version: text(m, "version"),
            state: text(m, "state"),
            reason: text(m, "reason"),
        })
        .collect();
    Ok((entries, workers))
}

/// A gateway's worker line ("ADDR ready", "ADDR unready: PROBLEM") as structured JSON.
fn worker_json(line: &str) -> serde_json::Value {
    let (addr, rest) = line.split_once(' ').unwrap_or((line, ""));
    let (state, problem) = match rest.split_once(": ") {
        Some((state, problem)) => (state, Some(problem)),
        None => (rest, None),
    };
    let mut v = serde_json::json!({"worker": addr, "ready": state == "ready"});
    if let Some(p) = problem {
        v["problem"] = p.into();
    }
    if addr == "..." {
        v = serde_json::json!({"more_workers": rest.trim_end_matches(" more").parse::<u64>().ok()});
    }
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn worker_lines_become_fields() {
        assert_eq!(
            super::worker_json("127.0.0.1:1 unready: ejected for 1s"),
            serde_json::json!({"worker": "127.0.0.1:1", "ready": false, "problem": "ejected for 1s"})
        );
        assert_eq!(
            super::worker_json("127.0.0.1:2 ready"),
            serde_json::json!({"worker": "127.0.0.1:2", "ready": true})
        );
        assert_eq!(
            super::worker_json("... 3 more"),
            serde_json::json!({"more_workers": 3})
        );
    }
}
