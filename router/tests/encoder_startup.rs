//! The `lorax-router` binary on an encoder model: two fake encoder shards over unix sockets (the
//! router finds the second through the first), LoRAX's limits for embedders
//! (`--max-input-length` equal to `--max-total-tokens`), a Warmup that echoes the prefill
//! budget (no KV cache): it starts, is healthy, reports what it serves, embeds, and refuses
//! generation. Spoken to over plain HTTP/1.1 on a loopback port.

mod grpc_fake;

use grpc_fake::two_fake_shards;
use lorax_router::testing::{
    fake_embedding, test_encoder_tokenizer, FakeShard, TEST_ENCODER_TOKENIZER_JSON,
};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the router when the test ends, passed or not.
struct Router(Child);

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One request; the status and the JSON body (Null when it is not JSON).
fn http(port: u16, method: &str, path: &str, body: Option<Value>) -> std::io::Result<(u16, Value)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let payload = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok((status, serde_json::from_str(payload).unwrap_or(Value::Null)))
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoder_model_starts_and_serves_embeddings_only() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("tokenizer.json"), TEST_ENCODER_TOKENIZER_JSON).unwrap();
    // Its Warmup answers what it was given as the prefill budget, as an encoder's shard does.
    let (_shards, _client) =
        two_fake_shards(dir.path(), || FakeShard::encoder(512, true, false)).await;
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_lorax-router"))
        .env_clear()
        .arg("--model-id")
        .arg(&model)
        .arg("--master-shard-uds-path")
        .arg(dir.path().join("lorax-server-0"))
        .args(["--hostname", "127.0.0.1", "--port", &port.to_string()])
        .args(["--max-input-length", "32", "--max-total-tokens", "32"])
        .args(["--max-batch-prefill-tokens", "512"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _router = Router(child);

    let deadline = Instant::now() + Duration::from_secs(60);
    let port_copy = port;
    let healthy = tokio::task::spawn_blocking(move || loop {
        if let Ok((200, _)) = http(port_copy, "GET", "/health", None) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    });
    assert!(healthy.await.unwrap(), "the router never became healthy");

    let checks = tokio::task::spawn_blocking(move || {
        let (status, info) = http(port, "GET", "/info", None).unwrap();
        assert_eq!(status, 200);
        assert_eq!(info["supports_generation"], false, "{info}");
        assert_eq!(info["supports_embeddings"], true);
        assert_eq!(info["supports_classification"], false);
        assert_eq!(info["embedding_dim"], 4);
        assert_eq!(info["architecture"], "BertModel");
        assert_eq!(info["max_batch_total_tokens"], 512);

        let text = "john lives in zurich";
        let (status, body) = http(port, "POST", "/embed", Some(json!({"inputs": text}))).unwrap();
        assert_eq!(status, 200, "{body}");
        let ids = test_encoder_tokenizer().encode(text, true).unwrap();
        assert_eq!(body["embeddings"], json!(fake_embedding(ids.get_ids())));

        let prompt = json!({"inputs": text, "parameters": {"max_new_tokens": 2}});
        let (status, body) = http(port, "POST", "/generate", Some(prompt)).unwrap();
        assert_eq!(status, 422, "{body}");
        assert!(body["error"].as_str().unwrap().contains("/embed"), "{body}");
        let (status, body) =
            http(port, "POST", "/classify", Some(json!({"inputs": text}))).unwrap();
        assert_eq!(status, 422, "{body}");
    });
    checks.await.unwrap();
}
