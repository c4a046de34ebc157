//! The `lorax-router` binary refuses flags it cannot use before it connects to any shard: it
//! exits non-zero with a message naming the flag, never with a panic.

use lorax_router::testing::TEST_TOKENIZER_JSON;
use std::process::Command;

/// Runs the router on a model directory holding only the test tokenizer, with `flags` and no
/// shard; returns its exit code and everything it wrote.
fn start(flags: &[&str]) -> (Option<i32>, String) {
    let model = tempfile::tempdir().unwrap();
    std::fs::write(model.path().join("tokenizer.json"), TEST_TOKENIZER_JSON).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_lorax-router"))
        .env_clear()
        .arg("--model-id")
        .arg(model.path())
        .args(["--master-shard-uds-path", "/nonexistent/lorax-test-socket"])
        .args(flags)
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.code(), text)
}

#[test]
fn unusable_start_up_flags_stop_the_router_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let bad_json = dir.path().join("tokenizer_config.json");
    std::fs::write(&bad_json, "{").unwrap();
    let bad_json = bad_json.to_str().unwrap();
    let missing = dir.path().join("missing.json");
    let missing = missing.to_str().unwrap();
    let cases: [(&[&str], String); 4] = [
        (
            &["--tokenizer-config-path", missing],
            format!("--tokenizer-config-path {missing}: cannot be read"),
        ),
        (
            &["--tokenizer-config-path", bad_json],
            format!("--tokenizer-config-path {bad_json}: is not valid JSON"),
        ),
        (
            &["--cors-allow-credentials"],
            "--cors-allow-credentials needs the origins named with --cors-allow-origin".into(),
        ),
        (
            &["--cors-allow-header", "bad header"],
            "--cors-allow-header: `bad header` is not a valid header name".into(),
        ),
    ];
    for (flags, message) in cases {
        let (code, text) = start(flags);
        assert_eq!(code, Some(1), "{flags:?}: {text}");
        assert!(text.contains(&message), "{flags:?}: {text}");
        assert!(!text.contains("panicked"), "{flags:?}: {text}");
    }
    let (code, text) = start(&["--validation-workers", "0"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--validation-workers"), "{text}");
}
