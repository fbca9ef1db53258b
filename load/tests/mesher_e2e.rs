//! Runs every scenario of mesher-load, small, against a real Mesher server and checks that the
//! counts add up (every published event received or reported dropped, no wrong filter match).
//!
//! It runs the server binary of the workspace's debug build, which `cargo test --workspace`
//! (scripts/test.sh) builds before any test runs; alone, run `cargo build -p mesher` first.
//! `MESHER_BIN` overrides where the binary is looked for.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the server may take to start listening.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(20);
const ADMIN_TOKEN: &str = "e2e-admin-token";

fn mesher_binary() -> PathBuf {
    if let Ok(path) = std::env::var("MESHER_BIN") {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let candidate = target.join("debug").join("mesher");
    assert!(
        candidate.exists(),
        "no mesher binary at {}: run `cargo build -p mesher` or set MESHER_BIN",
        candidate.display()
    );
    candidate
}

struct Server {
    child: Child,
    url: String,
    _data_dir: TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_server() -> Server {
    let port = free_port();
    let data_dir =
        std::env::temp_dir().join(format!("mesher-load-e2e-{}-{port}", std::process::id()));
    let child = Command::new(mesher_binary())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--shards",
            "1",
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--admin-token", ADMIN_TOKEN])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mesher");
    let server = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _data_dir: TempDir(data_dir),
    };
    let begin = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            begin.elapsed() < SERVER_START_TIMEOUT,
            "mesher did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

fn run_load(server: &Server, args: &[&str]) -> serde_json::Value {
    let pid = server.child.id().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_mesher-load"))
        .args(args)
        .args(["--target", "mesher", "--url", &server.url])
        .args(["--admin-token", ADMIN_TOKEN, "--server-pid", &pid, "--json"])
        .output()
        .expect("run mesher-load");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "mesher-load {args:?} failed:\n{stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"))
}

fn assert_counts_add_up(result: &serde_json::Value) {
    let n = |key: &str| result[key].as_u64().unwrap_or(u64::MAX);
    assert!(n("sent") > 0, "{result}");
    assert_eq!(n("errors"), 0, "{result}");
    assert_eq!(n("violations"), 0, "{result}");
    assert_eq!(n("missing"), 0, "{result}");
    assert_eq!(n("excess"), 0, "{result}");
    assert_eq!(n("wrong"), 0, "{result}");
    assert_eq!(n("unstamped"), 0, "{result}");
    assert_eq!(n("expected"), n("deliveries") + n("dropped"), "{result}");
    assert!(result["server_cpu_s"].as_f64().is_some(), "{result}");
}

#[test]
fn every_scenario_adds_up_against_mesher() {
    let server = start_server();

    let fanout = run_load(
        &server,
        &["fanout", "--subscribers", "50", "--duration", "1"],
    );
    assert_counts_add_up(&fanout);
    assert_eq!(fanout["subscribers_ready"], 50);

    let filters = run_load(
        &server,
        &["filters", "--subscribers", "40", "--duration", "1"],
    );
    assert_counts_add_up(&filters);

    let rooms = run_load(
        &server,
        &[
            "rooms",
            "--projects",
            "5",
            "--subscribers",
            "50",
            "--duration",
            "1",
        ],
    );
    assert_counts_add_up(&rooms);

    let e2e = run_load(
        &server,
        &[
            "e2e",
            "--subscribers",
            "40",
            "--rate",
            "200",
            "--duration",
            "1",
        ],
    );
    assert_counts_add_up(&e2e);
    let sent = e2e["sent"].as_u64().unwrap();
    assert!((150..=260).contains(&sent), "offered 200/s for 1 s: {e2e}");

    let slow = run_load(
        &server,
        &[
            "slow",
            "--subscribers",
            "20",
            "--slow-secs",
            "1",
            "--duration",
            "2",
        ],
    );
    assert_counts_add_up(&slow);
    assert!(slow["slow_p99_us"].as_u64().unwrap() >= 500_000, "{slow}");

    let ingest = run_load(
        &server,
        &["ingest", "--connections", "4", "--duration", "1"],
    );
    assert_eq!(ingest["errors"], 0, "{ingest}");
    assert_eq!(ingest["sent"], ingest["deliveries"], "{ingest}");
    assert!(ingest["p99_us"].as_u64().unwrap() > 0, "{ingest}");

    let sentry = run_load(
        &server,
        &["sentry", "--connections", "2", "--duration", "1"],
    );
    assert_eq!(sentry["errors"], 0, "{sentry}");
    assert!(sentry["sent"].as_u64().unwrap() > 0, "{sentry}");
    assert_eq!(sentry["sent"], sentry["deliveries"], "{sentry}");
    assert_eq!(sentry["publish_status"]["200"], sentry["sent"], "{sentry}");
    assert!(sentry["p99_us"].as_u64().unwrap() > 0, "{sentry}");
    assert!(sentry["settle_s"].as_f64().is_some(), "{sentry}");

    let conns = run_load(
        &server,
        &["conns", "--subscribers", "200", "--duration", "1"],
    );
    assert_eq!(conns["subscribers_ready"], 200, "{conns}");
    assert_eq!(conns["errors"], 0, "{conns}");
}
