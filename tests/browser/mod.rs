//! A small W3C WebDriver client over plain HTTP: a chromedriver of its own and one headless
//! Chromium session, enough to open the live page, click, read the page and take screenshots.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The key WebDriver names element references by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    agent: ureq::Agent,
}

impl Browser {
    /// Starts chromedriver (`CHROMEDRIVER`, else `chromedriver` on the PATH) and a headless
    /// Chromium (`CHROMIUM`, else /usr/bin/chromium) with a window of `width` x `height`.
    pub fn start(width: u32, height: u32) -> Browser {
        let port = super::common::free_port();
        let program = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let driver = Command::new(&program)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program} (scripts/test.sh installs it): {e}"));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while agent.get(format!("{base}/status")).call().is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
        let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": binary,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         format!("--window-size={width},{height}")],
            },
        }}});
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
            agent,
        };
        let session = browser.command("POST", "/session", Some(capabilities));
        browser.session = session["sessionId"]
            .as_str()
            .expect("session id")
            .to_string();
        browser
    }

    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let response = match method {
            "GET" => self.agent.get(&url).call(),
            "DELETE" => self.agent.delete(&url).call(),
            _ => self.agent.post(&url).send_json(body.unwrap_or(json!({}))),
        };
        let mut response = response.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status().as_u16();
        let answer: Value = response.body_mut().read_json().expect("webdriver JSON");
        assert!(status < 300, "{method} {path}: {status} {answer}");
        answer["value"].clone()
    }

    fn session_command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.command(method, &format!("/session/{}{path}", self.session), body)
    }

    pub fn open(&self, url: &str) {
        self.session_command("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; its return value.
    pub fn run(&self, script: &str, args: Value) -> Value {
        self.session_command(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Clicks the element `css` selects, as a user would (the driver moves the pointer to it).
    pub fn click(&self, css: &str) {
        let found = self.session_command(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        );
        let id = found[ELEMENT]
            .as_str()
            .expect("element reference")
            .to_string();
        self.session_command("POST", &format!("/element/{id}/click"), None);
    }

    /// Waits up to `limit` for `script` to return a truthy value; that value.
    pub fn wait_for(&self, what: &str, limit: Duration, script: &str) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let value = self.run(script, json!([]));
            let truthy = !matches!(&value, Value::Null | Value::Bool(false))
                && value != json!(0)
                && value != json!("");
            if truthy {
                return value;
            }
            assert!(Instant::now() < deadline, "page: {what} (waited {limit:?})");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let png = self.session_command("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("base64 PNG"))
            .expect("screenshot decodes");
        std::fs::write(path, bytes).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .agent
                .delete(format!("{}/session/{}", self.base, self.session))
                .call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
