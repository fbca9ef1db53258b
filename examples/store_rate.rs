//! Storage budget: rows per second the store commits through its own backend code, and, for
//! PostgreSQL, the raw COPY rate of the same rows into a plain table of the same shape on the
//! same server. PERF.md quotes both side by side.
//!
//! Usage:
//!   cargo run --release --example store_rate -- [--database-url URL] [--rows N] [--batch N]
//! Without a URL it measures the embedded SQLite store in a temporary directory.

use std::io::Write;
use std::time::{Duration, Instant};

use mesher::store::{self, Change, EventRow, IssueRow, ProjectRow};
use uuid::Uuid;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn main() {
    let rows: usize = arg("--rows").map_or(100_000, |v| v.parse().expect("--rows"));
    let batch: usize = arg("--batch").map_or(2_000, |v| v.parse().expect("--batch"));
    let url = arg("--database-url");
    let data_dir =
        std::env::temp_dir().join(format!("mesher-store-rate-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&data_dir).unwrap();
    let mut backend = match &url {
        Some(url) => store::open_postgres(url).expect("open PostgreSQL"),
        None => store::open_sqlite(&data_dir).expect("open SQLite"),
    };
    backend.migrate().expect("migrate");
    backend.maintain(now_us()).expect("maintain");

    let project = ProjectRow {
        id: Uuid::now_v7(),
        number: backend.next_project_number().expect("project number"),
        name: "store rate".into(),
        slug: format!("store-rate-{}", Uuid::new_v4().simple()),
        created_at_us: now_us(),
        rate_limit_per_minute: 0,
        sample_rate: 1.0,
        retention_days: 90,
    };
    let issue = IssueRow {
        id: Uuid::now_v7(),
        project_id: project.id,
        fingerprint: mesher::ingest::fingerprint::hash("msg:store rate"),
        title: "store rate".into(),
        level: "error".into(),
        status: "unresolved".into(),
        event_count: 0,
        first_seen_us: now_us(),
        last_seen_us: now_us(),
    };
    backend
        .commit(&[
            Change::Project(project.clone()),
            Change::Issue(issue.clone()),
        ])
        .expect("seed");
    let payload = format!(
        r#"{{"message":"store rate event","level":"error","environment":"bench","pad":"{}"}}"#,
        "x".repeat(930)
    );
    let make = |n: usize| -> Vec<EventRow> {
        (0..n)
            .map(|_| EventRow {
                id: Uuid::now_v7(),
                project_id: project.id,
                issue_id: issue.id,
                level: "error".into(),
                received_at_us: now_us(),
                payload: payload.clone().into(),
            })
            .collect()
    };

    // With PostgreSQL the raw COPY runs batch by batch in turn with the store's commits, so both
    // see the same server state (checkpoints, autovacuum) and neither gets the quieter half.
    let mut raw = url.map(|url| {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        client
            .batch_execute(
                "DROP TABLE IF EXISTS raw_copy_events; \
                 CREATE TABLE raw_copy_events (LIKE events INCLUDING INDEXES)",
            )
            .expect("create raw table");
        client
    });
    let mut store_elapsed = Duration::ZERO;
    let mut raw_elapsed = Duration::ZERO;
    let mut done = 0;
    while done < rows {
        let n = batch.min(rows - done);
        let changes: Vec<Change> = make(n).into_iter().map(Change::Event).collect();
        let started = Instant::now();
        backend.commit(&changes).expect("commit");
        store_elapsed += started.elapsed();
        if let Some(client) = raw.as_mut() {
            raw_elapsed += raw_copy(client, &make(n));
        }
        done += n;
    }
    println!(
        "| {} store commit | {rows} rows of ~{} B in batches of {batch} | {:.0} rows/s |",
        backend.name(),
        payload.len(),
        rows as f64 / store_elapsed.as_secs_f64()
    );
    if let Some(mut client) = raw {
        println!(
            "| raw COPY (text format, one transaction per batch) | {rows} rows in batches of {batch} | {:.0} rows/s |",
            rows as f64 / raw_elapsed.as_secs_f64()
        );
        client.batch_execute("DROP TABLE raw_copy_events").unwrap();
    }
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// COPY of the same rows in PostgreSQL's text format into the plain table; the time it took.
fn raw_copy(client: &mut postgres::Client, rows: &[EventRow]) -> Duration {
    let mut text = Vec::with_capacity(rows.len() * 1200);
    for row in rows {
        // The payload has nothing COPY's text format must escape.
        writeln!(
            text,
            "{}\t{}\t{}\t{}\t{}\t{}",
            row.id,
            row.project_id,
            row.issue_id,
            row.level,
            rfc3339(row.received_at_us),
            row.payload.as_str()
        )
        .unwrap();
    }
    let started = Instant::now();
    let mut transaction = client.transaction().unwrap();
    let mut writer = transaction
        .copy_in("COPY raw_copy_events (id, project_id, issue_id, level, received_at, payload) FROM STDIN")
        .expect("copy in");
    writer.write_all(&text).unwrap();
    writer.finish().expect("copy finish");
    transaction.commit().unwrap();
    started.elapsed()
}

fn rfc3339(unix_us: i64) -> String {
    mesher::issues::rfc3339(unix_us)
}
