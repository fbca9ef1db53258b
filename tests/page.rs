//! The live page in real headless Chromium, driven over WebDriver against the real server.

mod browser;
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use browser::Browser;
use common::*;
use serde_json::{json, Value};

/// How long the page has to show what the server sent it.
const SHOWN_WITHIN: Duration = Duration::from_secs(1);
/// How long a reconnect (backoff included) may take.
const RECONNECT_WITHIN: Duration = Duration::from_secs(20);

/// One browser at a time: each test measures how quickly its page answers, which a second
/// Chromium sharing the cores would distort.
static ONE_BROWSER: Mutex<()> = Mutex::new(());

fn one_browser() -> std::sync::MutexGuard<'static, ()> {
    ONE_BROWSER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A TCP proxy in front of the server: the browser talks to it, so the test can cut every
/// connection (the network dropping) or point it at a restarted server (a deploy).
struct Proxy {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (to, streams) = (target.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = TcpStream::connect(*to.lock().unwrap()) else {
                    continue;
                };
                let mut list = streams.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        Proxy { addr, target, open }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Drops every connection open now, both ways, as a failing network would.
    fn cut(&self) {
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn point_at(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

fn page_url(proxy: &Proxy, project: &Project) -> String {
    proxy.url(&format!(
        "/#project={}&key={}",
        project.slug, project.dashboard_key
    ))
}

/// The live page of `project` in a fresh Chromium window of `width` x `height`, reaching the
/// server through a proxy, once it says it is live.
struct LivePage {
    browser: Browser,
    proxy: Proxy,
    _turn: std::sync::MutexGuard<'static, ()>,
}

fn open_live(server: &Server, project: &Project, width: u32, height: u32) -> LivePage {
    let turn = one_browser();
    let proxy = Proxy::start(server.addr);
    let browser = Browser::start(width, height);
    browser.open(&page_url(&proxy, project));
    browser.wait_for(
        "live",
        RECONNECT_WITHIN,
        "return document.getElementById('connection').dataset.state === 'live';",
    );
    LivePage {
        browser,
        proxy,
        _turn: turn,
    }
}

fn post(server: &Server, project: &Project, event: Value) -> Value {
    let (status, body) = server.event(&project.ingest_key, &event);
    assert_eq!(status, 202, "{body}");
    body
}

fn text_of(browser: &Browser, css: &str) -> String {
    browser
        .run(
            "const n = document.querySelector(arguments[0]); return n ? n.textContent : null;",
            json!([css]),
        )
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Where the screenshots go: beside the build, for the README to show.
fn screenshot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn events_issues_status_and_filters_show_live() {
    let server = Server::start();
    let project = server.project("Live Page");
    let LivePage {
        browser,
        proxy: _proxy,
        _turn,
    } = open_live(&server, &project, 1280, 800);
    assert_eq!(text_of(&browser, "#count"), "0");
    assert_eq!(
        browser.run("return location.hash;", json!([])),
        json!(""),
        "the key leaves the address bar once stored"
    );

    // Events appear, newest on top, and their new issue joins the list.
    for n in 0..3 {
        post(
            &server,
            &project,
            json!({ "message": format!("checkout failed {n}"), "level": "error", "environment": "production" }),
        );
    }
    let posted = Instant::now();
    browser.wait_for(
        "three event rows",
        SHOWN_WITHIN,
        "return document.querySelectorAll('#events li.event').length === 3;",
    );
    println!(
        "three events shown {:?} after the last post",
        posted.elapsed()
    );
    assert_eq!(
        text_of(&browser, "#events li.event .message"),
        "checkout failed 2"
    );
    let issue = post(
        &server,
        &project,
        json!({ "message": "payment declined", "level": "error" }),
    );
    let issue_id = issue["issue_id"].as_str().unwrap().to_string();
    browser.wait_for(
        "the new issue",
        SHOWN_WITHIN,
        &format!("return !!document.querySelector('#issues li[data-issue-id=\"{issue_id}\"]');"),
    );
    browser.wait_for(
        "count 4",
        SHOWN_WITHIN,
        "return document.getElementById('count').textContent === '4';",
    );
    let event_count = format!("#issues li[data-issue-id=\"{issue_id}\"] .event-count");
    assert_eq!(text_of(&browser, &event_count), "1 event");
    let form_hidden = "return document.getElementById('login').offsetParent === null;";
    assert_eq!(
        browser.run(form_hidden, json!([])),
        json!(true),
        "no form once a project is open"
    );

    // Resolve from the page: the issue shows resolved, the count drops, the API agrees.
    browser.click(&format!(
        "#issues li[data-issue-id=\"{issue_id}\"] .action-resolve"
    ));
    browser.wait_for("the issue resolved", RECONNECT_WITHIN, &format!("return !!document.querySelector('#issues li.status-resolved[data-issue-id=\"{issue_id}\"]');"));
    browser.wait_for(
        "count 3",
        SHOWN_WITHIN,
        "return document.getElementById('count').textContent === '3';",
    );
    let (_, stored) = server.get(
        &format!("/api/v1/issues/{issue_id}"),
        Some(&project.dashboard_key),
    );
    assert_eq!(stored["status"], "resolved");

    // Level `error` only: a warning posted after does not show, an error does.
    browser.click("#filter-level option[value='error']");
    let latency = browser.wait_for(
        "filters applied",
        SHOWN_WITHIN,
        "return window.mesherStats.filterLatencyMs;",
    );
    println!("filter change applied {latency} ms after it was sent");
    post(
        &server,
        &project,
        json!({ "message": "disk nearly full", "level": "warning" }),
    );
    post(
        &server,
        &project,
        json!({ "message": "disk full", "level": "error" }),
    );
    browser.wait_for(
        "the error",
        SHOWN_WITHIN,
        "return document.querySelector('#events li.event .message').textContent === 'disk full';",
    );
    let messages = browser.run("return [...document.querySelectorAll('#events li.event .message')].map(n => n.textContent);", json!([]));
    assert!(
        !messages
            .as_array()
            .unwrap()
            .contains(&json!("disk nearly full")),
        "{messages}"
    );

    // Untrusted text stays text.
    browser.click("#filter-level option[value='']");
    browser.wait_for(
        "filters applied",
        SHOWN_WITHIN,
        "return document.getElementById('filters-state').textContent === 'filters applied';",
    );
    let hostile = "<img src=x onerror=\"document.title='pwned'\">";
    post(
        &server,
        &project,
        json!({ "message": hostile, "level": "error" }),
    );
    browser.wait_for(
        "the hostile event as text",
        SHOWN_WITHIN,
        &format!(
            "return document.querySelector('#events li.event .message').textContent === {};",
            json!(hostile)
        ),
    );
    assert_eq!(
        browser.run("return document.title;", json!([])),
        json!("Mesher")
    );
    assert_eq!(
        browser.run(
            "return document.querySelectorAll('#events img').length;",
            json!([])
        ),
        json!(0)
    );

    browser.click("#events li.event");
    browser.wait_for(
        "the event's JSON",
        SHOWN_WITHIN,
        "return !!document.querySelector('#events li.event pre.json');",
    );
    browser.screenshot(&screenshot_dir().join("live-page-1280x800.png"));

    let page = ureq::get(&server.url("/")).call().unwrap();
    let policy = page
        .headers()
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        policy.contains("default-src 'none'") && policy.contains("script-src 'self'"),
        "{policy}"
    );
}

#[test]
fn the_page_comes_back_after_a_restart_and_after_a_dropped_connection() {
    let server = Server::start();
    let project = server.project("Reconnects");
    post(
        &server,
        &project,
        json!({ "message": "before the restart", "level": "error" }),
    );
    let LivePage {
        browser,
        proxy,
        _turn,
    } = open_live(&server, &project, 390, 844);
    browser.wait_for(
        "one issue",
        SHOWN_WITHIN,
        "return document.querySelectorAll('#issues li').length === 1;",
    );

    // A deploy: the server stops and comes back (a new epoch); the page says it is
    // reconnecting, then is live again with the issue list reloaded.
    let mut server = server;
    assert!(server.terminate().success());
    browser.wait_for(
        "reconnecting",
        RECONNECT_WITHIN,
        "return document.getElementById('connection').dataset.state === 'reconnecting';",
    );
    server = server.restart_stopped();
    proxy.point_at(server.addr);
    post(
        &server,
        &project,
        json!({ "message": "while the page was away", "level": "error" }),
    );
    browser.wait_for(
        "live again",
        RECONNECT_WITHIN,
        "return document.getElementById('connection').dataset.state === 'live';",
    );
    browser.wait_for(
        "the reloaded list",
        RECONNECT_WITHIN,
        "return document.querySelectorAll('#issues li').length === 2;",
    );
    assert_eq!(
        browser.run("return window.mesherStats.resumes;", json!([])),
        json!([false])
    );

    // The network drops for a moment: the page resumes and shows what it missed.
    proxy.cut();
    post(
        &server,
        &project,
        json!({ "message": "missed during the drop", "level": "error" }),
    );
    browser.wait_for(
        "resumed",
        RECONNECT_WITHIN,
        "return window.mesherStats.resumes.length === 2;",
    );
    assert_eq!(
        browser.run("return window.mesherStats.resumes;", json!([])),
        json!([false, true])
    );
    browser.wait_for("the missed event", SHOWN_WITHIN, "return [...document.querySelectorAll('#events li.event .message')].some(n => n.textContent === 'missed during the drop');");
    browser.screenshot(&screenshot_dir().join("live-page-390x844.png"));
}

#[test]
fn the_page_keeps_500_rows_and_answers_a_filter_click_under_200_events_per_second() {
    let server = Server::start();
    let project = server.project("Busy");
    let LivePage {
        browser,
        proxy: _proxy,
        _turn,
    } = open_live(&server, &project, 1280, 800);
    let publisher = {
        let (addr, key) = (server.addr, project.ingest_key.clone());
        std::thread::spawn(move || {
            let agent = ureq::Agent::new_with_defaults();
            let start = Instant::now();
            let mut sent = 0u32;
            while start.elapsed() < Duration::from_secs(20) {
                let body = json!([{ "message": format!("burst {sent}"), "level": "error" },
                                  { "message": format!("burst {}", sent + 1), "level": "warning" }]);
                let answer = agent
                    .post(format!("http://{addr}/api/v1/events/bulk"))
                    .header("Authorization", format!("Bearer {key}"))
                    .send_json(body);
                assert!(answer.is_ok());
                sent += 2;
                // 200 events per second, in pairs.
                let due = start + Duration::from_millis(10 * sent as u64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_secs(8));
    browser.click("#filter-level option[value='error']");
    let latency = browser.wait_for(
        "filters applied",
        Duration::from_secs(5),
        "return window.mesherStats.filterLatencyMs;",
    );
    println!("filter click handled in {latency} ms under load");
    assert!(
        latency.as_f64().unwrap() < 200.0,
        "filter click took {latency} ms"
    );
    let sent = publisher.join().unwrap();
    let rows = browser.run(
        "return document.querySelectorAll('#events li.event').length;",
        json!([]),
    );
    println!("{sent} events sent, {rows} rows kept");
    assert!(sent >= 2000);
    assert_eq!(rows, json!(500));
}
