//! The io_uring ceiling on this machine: the least work a server can do per HTTP request
//! (one read, one fixed reply written per request seen) on one tokio-uring reactor thread whose
//! ring is set up as mesher's are, so that the two differ only in what they do per request.
//! PERF.md measures it with wrk beside `mesher`'s own `/health` and ingest throughput.
//!
//! Usage: `cargo run --release --example uring_ceiling -- 127.0.0.1:9000`

use std::rc::Rc;

use tokio_uring::buf::BoundedBuf;

const REPLY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok";

fn main() {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".into());
    let runtime = mesher::shard::reactor_runtime().expect("io_uring");
    runtime.block_on(async move {
        let listener =
            tokio_uring::net::TcpListener::bind(address.parse().expect("address")).expect("bind");
        eprintln!("uring_ceiling listening on {address}");
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let _ = stream.set_nodelay(true);
            tokio_uring::spawn(serve(Rc::new(stream)));
        }
    });
}

/// Answers every complete request head in what arrives; pipelined requests get one write.
async fn serve(stream: Rc<tokio_uring::net::TcpStream>) {
    let mut input = vec![0u8; 16 * 1024];
    let mut carry = 0usize;
    let mut output = Vec::with_capacity(4096);
    loop {
        let (result, buf) = stream.read(input.slice(carry..)).await;
        input = buf.into_inner();
        let n = match result {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let filled = carry + n;
        let mut start = 0;
        while let Some(end) = find(&input[start..filled], b"\r\n\r\n") {
            start += end + 4;
            output.extend_from_slice(REPLY);
        }
        input.copy_within(start..filled, 0);
        carry = filled - start;
        if carry == input.len() {
            return;
        }
        if !output.is_empty() {
            let (result, buf) = stream.write_all(output).await;
            output = buf;
            output.clear();
            if result.is_err() {
                return;
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
