//! The shortest end-to-end path: project, event, issue, stream message.

mod common;

use common::*;
use serde_json::json;

#[test]
fn event_reaches_issue_list_and_stream() {
    let server = Server::start();
    let project = server.project("Smoke Shop");
    let (mut ws, first) = server.subscribe(&project);
    let epoch = first["epoch"].as_str().expect("epoch").to_owned();
    assert_eq!(
        first,
        json!({"type": "issue_count", "offset": 0, "epoch": epoch, "project_id": project.id, "count": 0})
    );
    let (status, body) = server.event(
        &project.ingest_key,
        &json!({"message": "boom", "level": "error"}),
    );
    assert_eq!(status, 202, "{body}");
    let issue = next_json(&mut ws);
    assert_eq!(
        (issue["type"].as_str(), issue["action"].as_str()),
        (Some("issue"), Some("created"))
    );
    assert_eq!(issue["offset"], 1);
    assert_eq!(issue["issue"]["id"], body["issue_id"]);
    let event = next_json(&mut ws);
    assert_eq!(event["type"], "event");
    assert_eq!(event["offset"], 2);
    assert_eq!(event["event_id"], body["event_id"]);
    assert_eq!(event["data"], json!({"message": "boom", "level": "error"}));
    let count = next_json(&mut ws);
    assert_eq!(
        count,
        json!({"type": "issue_count", "offset": 3, "project_id": project.id, "count": 1})
    );
    let (status, list) = server.get(
        &format!("/api/v1/projects/{}/issues", project.slug),
        Some(&project.dashboard_key),
    );
    assert_eq!(status, 200);
    assert_eq!(list["data"][0]["id"], body["issue_id"]);
    assert_eq!(list["data"][0]["event_count"], 1);
}
