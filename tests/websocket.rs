//! WebSocket rules of PROTOCOL.md section 6 on /ingest and the stream: upgrades, the frame rules
//! (checked with hand-built frames a client library would refuse to send), pings and closes.

mod common;

use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
const FIN: u8 = 0x80;
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const MIB: usize = 1024 * 1024;

/// The header of a client frame: first byte (FIN, RSV, opcode), then the length, then the mask
/// if any.
fn frame_head(first: u8, masked: bool, len: usize) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut head = vec![first];
    if len < 126 {
        head.push(mask_bit | len as u8);
    } else if len <= u16::MAX as usize {
        head.push(mask_bit | 126);
        head.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        head.push(mask_bit | 127);
        head.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if masked {
        head.extend_from_slice(&MASK);
    }
    head
}

/// A whole client frame, masked as RFC 6455 requires.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = frame_head(first, true, payload.len());
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    bytes
}

fn unmasked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = frame_head(first, false, payload.len());
    bytes.extend_from_slice(payload);
    bytes
}

/// Reads past data frames and pings to the close frame; returns its code, then checks that the
/// server ends the stream.
fn expect_close(stream: &mut TcpStream) -> u16 {
    loop {
        let (first, payload) =
            read_frame(stream).expect("a close frame before the end of the stream");
        if first & 0x0f == OP_CLOSE {
            assert_eq!(first & FIN, FIN);
            assert!(payload.len() >= 2, "close frame carries a code");
            assert!(
                std::str::from_utf8(&payload[2..]).is_ok(),
                "close reason is UTF-8"
            );
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            assert!(
                read_frame(stream).is_none(),
                "nothing after the close frame"
            );
            return code;
        }
    }
}

fn project_paths(server: &Server) -> (Project, String, String) {
    let project = server.project("Sockets");
    let ingest = format!("/ingest?key={}", project.ingest_key);
    let stream = format!(
        "/stream/projects/{}?key={}",
        project.id, project.dashboard_key
    );
    (project, ingest, stream)
}

fn text_json(message: Message) -> Value {
    match message {
        Message::Text(text) => serde_json::from_str(&text).expect("JSON text"),
        other => panic!("expected a text message, got {other:?}"),
    }
}

#[test]
fn upgrades_on_ingest_and_stream_paths() {
    let server = Server::start();
    let (project, ingest_path, stream_path) = project_paths(&server);

    let mut ingest = server.ws(&ingest_path).expect("ingest upgrade");
    ingest
        .send(Message::text(
            json!({"message": "over a socket"}).to_string(),
        ))
        .unwrap();
    let reply = text_json(ingest.read().unwrap());
    assert_eq!(reply["status"], "accepted", "{reply}");
    assert!(reply["event_id"].is_string() && reply["issue_id"].is_string());
    ingest
        .send(Message::text(
            json!([{"message": "a"}, {"message": "b"}]).to_string(),
        ))
        .unwrap();
    let reply = text_json(ingest.read().unwrap());
    assert_eq!(
        reply["results"].as_array().map(Vec::len),
        Some(2),
        "{reply}"
    );
    ingest.send(Message::text("{not json")).unwrap();
    let reply = text_json(ingest.read().unwrap());
    assert!(reply["error"].is_string(), "{reply}");

    let mut stream = server.ws(&stream_path).expect("stream upgrade");
    let mut first = next_json(&mut stream);
    let fields = first.as_object_mut().unwrap();
    assert!(fields.remove("epoch").is_some_and(|e| e.is_string()));
    assert!(fields.remove("offset").is_some_and(|o| o.is_u64()));
    assert_eq!(
        first,
        json!({"type": "issue_count", "project_id": project.id, "count": 3})
    );
    let mut by_slug = server
        .ws(&format!(
            "/ws/stream/projects/{}?token={}",
            project.slug, project.dashboard_key
        ))
        .unwrap();
    assert_eq!(next_json(&mut by_slug)["type"], "issue_count");

    // The key is checked before the upgrade.
    let refused = |path: &str| match server.ws(path) {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("{path}: {other}"),
        Ok(_) => panic!("{path}: upgraded"),
    };
    assert_eq!(
        refused("/ingest?key=mshr_000000000000000000000000000000000000000000000000"),
        401
    );
    assert_eq!(refused("/ingest"), 401);
    assert_eq!(
        refused(&format!(
            "/stream/projects/{}?key={}",
            project.id, project.ingest_key
        )),
        403
    );
    assert_eq!(
        refused(&format!(
            "/stream/projects/no-such-project?key={}",
            project.dashboard_key
        )),
        404
    );
}

#[test]
fn unmasked_client_frame_closes_with_1002() {
    let server = Server::start();
    let (_, ingest, stream) = project_paths(&server);
    for path in [&ingest, &stream] {
        let mut socket = server.raw_ws(path);
        send_raw(
            &mut socket,
            &unmasked_frame(FIN | OP_TEXT, br#"{"message":"unmasked"}"#),
        );
        assert_eq!(expect_close(&mut socket), 1002, "{path}");
    }
}

#[test]
fn message_over_1_mib_closes_with_1009() {
    let server = Server::start();
    let (_, ingest, _) = project_paths(&server);

    // One frame announced one byte over the limit: decided from the header, no payload sent.
    let mut socket = server.raw_ws(&ingest);
    send_raw(&mut socket, &frame_head(FIN | OP_TEXT, true, MIB + 1));
    assert_eq!(expect_close(&mut socket), 1009);

    // Fragments that only together pass the limit.
    let mut socket = server.raw_ws(&ingest);
    let first = [br#"{"message":""#.as_slice(), &vec![b'a'; 600 * 1024]].concat();
    send_raw(&mut socket, &frame(OP_TEXT, &first));
    send_raw(
        &mut socket,
        &frame_head(FIN | OP_CONTINUATION, true, 600 * 1024),
    );
    assert_eq!(expect_close(&mut socket), 1009);

    // Exactly 1 MiB, in one frame and in fragments, is accepted.
    let message = "x".repeat(MIB - r#"{"message":""}"#.len());
    let event = format!(r#"{{"message":"{message}"}}"#);
    assert_eq!(event.len(), MIB);
    let mut socket = server.raw_ws(&ingest);
    send_raw(&mut socket, &frame(FIN | OP_TEXT, event.as_bytes()));
    let (first_byte, reply) = read_frame(&mut socket).expect("reply to a 1 MiB event");
    assert_eq!(first_byte, FIN | OP_TEXT);
    assert_eq!(
        serde_json::from_slice::<Value>(&reply).unwrap()["status"],
        "accepted"
    );
    let (head, tail) = event.as_bytes().split_at(MIB / 2 + 3);
    send_raw(&mut socket, &frame(OP_TEXT, head));
    send_raw(&mut socket, &frame(FIN | OP_CONTINUATION, tail));
    let (_, reply) = read_frame(&mut socket).expect("reply to a fragmented 1 MiB event");
    assert_eq!(
        serde_json::from_slice::<Value>(&reply).unwrap()["status"],
        "accepted"
    );
}

#[test]
fn invalid_utf8_text_closes_with_1007() {
    let server = Server::start();
    let (_, ingest, stream) = project_paths(&server);

    let mut socket = server.raw_ws(&ingest);
    send_raw(
        &mut socket,
        &frame(FIN | OP_TEXT, b"{\"message\":\"\xff\xfe\"}"),
    );
    assert_eq!(expect_close(&mut socket), 1007);

    // Invalid inside a fragmented message.
    let mut socket = server.raw_ws(&stream);
    send_raw(
        &mut socket,
        &frame(
            OP_TEXT,
            b"{\"type\":\"subscribe\",\"filters\":{\"level\":\"",
        ),
    );
    send_raw(&mut socket, &frame(FIN | OP_CONTINUATION, b"\xc3\x28\"}}"));
    assert_eq!(expect_close(&mut socket), 1007);

    // A character cut between two fragments is valid.
    let mut socket = server.raw_ws(&stream);
    let text = "{\"type\":\"subscribe\",\"filters\":{\"environment\":\"prød\"}}".as_bytes();
    let cut = text.iter().position(|b| *b == 0xc3).unwrap() + 1;
    send_raw(&mut socket, &frame(OP_TEXT, &text[..cut]));
    send_raw(&mut socket, &frame(FIN | OP_CONTINUATION, &text[cut..]));
    let reply = loop {
        let (first, payload) = read_frame(&mut socket).expect("reply to a subscribe");
        let value: Value = serde_json::from_slice(&payload).unwrap();
        if first & 0x0f == OP_TEXT && value["type"] != "issue_count" {
            break value;
        }
    };
    assert_eq!(
        reply,
        json!({"type": "filters_updated", "filters": {"environment": "prød"}})
    );
}

#[test]
fn protocol_errors_close_with_1002() {
    let server = Server::start();
    let (_, ingest, stream) = project_paths(&server);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "RSV1 without an extension",
            frame(FIN | 0x40 | OP_TEXT, br#"{"message":"x"}"#),
        ),
        ("RSV3 on a ping", frame(FIN | 0x10 | OP_PING, b"")),
        ("reserved data opcode 3", frame(FIN | 0x3, b"abc")),
        ("reserved control opcode 11", frame(FIN | 0xB, b"")),
        (
            "continuation without a message",
            frame(FIN | OP_CONTINUATION, b"abc"),
        ),
        ("fragmented ping", frame(OP_PING, b"abc")),
        ("ping over 125 bytes", frame(FIN | OP_PING, &[b'p'; 126])),
        (
            "new message inside a fragmented one",
            [frame(OP_TEXT, b"ab"), frame(FIN | OP_TEXT, b"cd")].concat(),
        ),
    ];
    for (index, (what, bytes)) in cases.into_iter().enumerate() {
        let path = if index % 2 == 0 { &ingest } else { &stream };
        let mut socket = server.raw_ws(path);
        send_raw(&mut socket, &bytes);
        assert_eq!(expect_close(&mut socket), 1002, "{what}");
    }
}

#[test]
fn ping_is_answered_with_the_same_payload() {
    let server = Server::start();
    let (_, ingest, stream) = project_paths(&server);
    for path in [&ingest, &stream] {
        let mut socket = server.raw_ws(path);
        let payload = b"are you there? \x00\x01\xff";
        send_raw(&mut socket, &frame(FIN | OP_PING, payload));
        let pong = loop {
            let (first, data) = read_frame(&mut socket).expect("pong");
            if first & 0x0f != OP_TEXT {
                break (first, data);
            }
        };
        assert_eq!(pong, (FIN | OP_PONG, payload.to_vec()), "{path}");
        // An empty ping too, and the connection keeps working.
        send_raw(&mut socket, &frame(FIN | OP_PING, b""));
        let pong = loop {
            let (first, data) = read_frame(&mut socket).expect("pong");
            if first & 0x0f != OP_TEXT {
                break (first, data);
            }
        };
        assert_eq!(pong, (FIN | OP_PONG, Vec::new()));
    }
    let mut socket = server.raw_ws(&ingest);
    send_raw(
        &mut socket,
        &frame(FIN | OP_TEXT, br#"{"message":"after pings"}"#),
    );
    let (_, reply) = read_frame(&mut socket).unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&reply).unwrap()["status"],
        "accepted"
    );
    // A binary frame is not a protocol error, just refused.
    send_raw(&mut socket, &frame(FIN | OP_BINARY, b"\x00\x01"));
    let (first, reply) = read_frame(&mut socket).unwrap();
    assert_eq!(first, FIN | OP_TEXT);
    assert!(serde_json::from_slice::<Value>(&reply).unwrap()["error"].is_string());
}

#[test]
fn client_close_is_answered_with_close() {
    let server = Server::start();
    let (_, ingest, stream) = project_paths(&server);
    for path in [&ingest, &stream] {
        let mut socket = server.raw_ws(path);
        send_raw(
            &mut socket,
            &frame(
                FIN | OP_CLOSE,
                &[&1000u16.to_be_bytes()[..], b"bye"].concat(),
            ),
        );
        assert_eq!(expect_close(&mut socket), 1000, "{path}");

        // The same through a client library: the handshake completes cleanly.
        let mut ws = server.ws(path).unwrap();
        ws.close(Some(tungstenite::protocol::CloseFrame {
            code: CloseCode::Normal,
            reason: "done".into(),
        }))
        .unwrap();
        // tungstenite reports ConnectionClosed only once the server's close frame has arrived.
        loop {
            match ws.read() {
                Ok(Message::Close(_) | Message::Text(_) | Message::Ping(_) | Message::Pong(_)) => {
                    continue
                }
                Err(tungstenite::Error::ConnectionClosed) => break,
                other => panic!("{path}: {other:?}"),
            }
        }
    }
}

/// Reads for `duration`, answering pings (tungstenite does while reading); returns pings seen.
fn read_answering_pings(clients: &mut [&mut Ws], duration: Duration) -> Vec<usize> {
    for ws in clients.iter_mut() {
        ws.get_mut()
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
    }
    let mut pings = vec![0; clients.len()];
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        for (index, ws) in clients.iter_mut().enumerate() {
            match ws.read() {
                Ok(Message::Ping(_)) => pings[index] += 1,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("client {index} lost its connection: {e}"),
            }
        }
    }
    for ws in clients.iter_mut() {
        ws.get_mut()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
    }
    pings
}

#[test]
fn server_pings_and_keeps_clients_that_answer() {
    let server = Server::start_with(
        Backend::Sqlite,
        &["--ping-interval", "1", "--pong-timeout", "1"],
    );
    let (_, ingest_path, stream_path) = project_paths(&server);
    let mut ingest = server.ws(&ingest_path).unwrap();
    let mut stream = server.ws(&stream_path).unwrap();
    let pings = read_answering_pings(&mut [&mut ingest, &mut stream], Duration::from_millis(4500));
    assert!(pings.iter().all(|p| *p >= 2), "pings seen: {pings:?}");
    // Both still work.
    ingest
        .send(Message::text(r#"{"message":"still here"}"#))
        .unwrap();
    let reply = loop {
        match ingest.read().unwrap() {
            Message::Text(text) => break serde_json::from_str::<Value>(&text).unwrap(),
            _ => continue,
        }
    };
    assert_eq!(reply["status"], "accepted");
    stream
        .send(Message::text(r#"{"type":"subscribe","filters":{}}"#))
        .unwrap();
    assert_eq!(
        next_of_type(&mut stream, "filters_updated")["type"],
        "filters_updated"
    );
}

#[test]
fn client_that_never_answers_pings_is_closed() {
    let server = Server::start_with(
        Backend::Sqlite,
        &["--ping-interval", "1", "--pong-timeout", "1"],
    );
    let (_, ingest, stream) = project_paths(&server);
    for path in [&stream, &ingest] {
        let mut socket = server.raw_ws(path);
        let started = Instant::now();
        let mut pings = 0;
        loop {
            match read_frame(&mut socket) {
                Some((first, _)) if first & 0x0f == OP_PING => pings += 1,
                Some((first, _)) if first & 0x0f == OP_CLOSE => {
                    assert!(
                        read_frame(&mut socket).is_none(),
                        "nothing after the close frame"
                    );
                    break;
                }
                Some(_) => {}
                None => break,
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{path}: still open after {pings} pings"
            );
        }
        assert!(pings >= 1, "{path}: pinged before being closed");
    }
}
