//! HTTP request parsing: one typical ingest POST (head and body) and a pipelined buffer of GETs.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mesher::http::parse::{parse_head, BodyDecoder, BodyKind};

/// Ingest bodies are limited to 1 MiB (PROTOCOL.md section 4).
const BODY_LIMIT_BYTES: usize = 1 << 20;
const PIPELINED_REQUESTS: usize = 16;

fn ingest_post() -> Vec<u8> {
    let body = r#"{"message":"TypeError: cannot read properties of undefined (reading 'id')","level":"error","environment":"production","tags":{"release":"shop@1.4.2","browser":"Firefox 128"},"exception":{"type_name":"TypeError","value":"cannot read properties of undefined"},"sdk_name":"mesher-js","sdk_version":"1.4.2"}"#;
    let head = format!(
        "POST /api/v1/events HTTP/1.1\r\n\
         Host: ingest.example.com:8080\r\n\
         User-Agent: mesher-js/1.4.2 (Linux x86_64)\r\n\
         Content-Type: application/json\r\n\
         Accept: */*\r\n\
         Accept-Encoding: gzip, deflate\r\n\
         Authorization: Bearer mshr_0123456789abcdef0123456789abcdef0123456789abcdef\r\n\
         Connection: keep-alive\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    [head.as_bytes(), body.as_bytes()].concat()
}

fn pipelined_gets() -> Vec<u8> {
    (0..PIPELINED_REQUESTS)
        .flat_map(|index| {
            format!(
                "GET /api/v1/issues/0190a5b2-7c1e-7d3a-9f00-00000000{index:04}/events?limit=25 HTTP/1.1\r\n\
                 Host: api.example.com\r\n\
                 Authorization: Bearer mshd_0123456789abcdef0123456789abcdef0123456789abcdef\r\n\
                 Accept: application/json\r\n\r\n"
            )
            .into_bytes()
        })
        .collect()
}

fn bench_http_parse(c: &mut Criterion) {
    let post = ingest_post();
    let head_len = parse_head(&post).unwrap().unwrap().head_len;
    let mut group = c.benchmark_group("http_parse");
    group.throughput(Throughput::Bytes(post.len() as u64));
    group.bench_function(
        format!("post_head_{head_len}b_and_body_{}b", post.len() - head_len),
        |b| {
            b.iter(|| {
                let buf = black_box(&post[..]);
                let head = parse_head(buf).unwrap().unwrap();
                let mut decoder = BodyDecoder::new(&head.body, BODY_LIMIT_BYTES).unwrap();
                let used = decoder.feed(&buf[head.head_len..]).unwrap();
                debug_assert!(decoder.is_done());
                (head, used, decoder.take_body())
            })
        },
    );

    let gets = pipelined_gets();
    group.throughput(Throughput::Elements(PIPELINED_REQUESTS as u64));
    group.bench_function(format!("pipelined_{PIPELINED_REQUESTS}_gets"), |b| {
        b.iter(|| {
            let buf = black_box(&gets[..]);
            let mut offset = 0;
            let mut requests = 0;
            while offset < buf.len() {
                let head = parse_head(&buf[offset..]).unwrap().unwrap();
                debug_assert_eq!(head.body, BodyKind::None);
                offset += head.head_len;
                requests += 1;
                black_box(head);
            }
            requests
        })
    });
    group.finish();
}

criterion_group!(benches, bench_http_parse);
criterion_main!(benches);
