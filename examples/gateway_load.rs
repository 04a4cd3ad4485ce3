//! Load generator for `scripts/bench-gateway` (a benchmark tool, not a test).
//!
//! `--rate R --secs S`: open-loop, one request every 1/R s for S s (latency measured from
//! the moment a request was due, so a stalled server cannot hide its queueing);
//! `--concurrent N`: N requests at once (long streams, to measure memory).
//! With `--stream`, the first body byte (time to first byte) is reported as well.
//! Prints one line: `name ok=… errors=… rate=… p50_ms=… p99_ms=… max_ms=… [ttfb_p50_ms=… ttfb_p99_ms=…]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::sync::Mutex;

#[derive(Parser)]
struct Args {
    /// What the line is called.
    #[arg(long)]
    name: String,
    #[arg(long)]
    url: String,
    #[arg(long)]
    key: String,
    #[arg(long)]
    body: String,
    /// Extra request headers, `name: value`.
    #[arg(long = "header")]
    headers: Vec<String>,
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    #[arg(long, default_value_t = 0)]
    concurrent: usize,
    #[arg(long)]
    stream: bool,
}

#[derive(Default)]
struct Samples {
    total: Vec<Duration>,
    ttfb: Vec<Duration>,
    errors: u64,
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

async fn one(http: reqwest::Client, args: Arc<Args>, due: Instant, out: Arc<Mutex<Samples>>) {
    let mut req = http
        .post(&args.url)
        .bearer_auth(&args.key)
        .header("content-type", "application/json")
        .body(args.body.clone());
    for h in &args.headers {
        if let Some((k, v)) = h.split_once(':') {
            req = req.header(k.trim(), v.trim());
        }
    }
    let result = async {
        let mut res = req.send().await?;
        let ok = res.status().is_success();
        let mut first = None;
        while let Some(chunk) = res.chunk().await? {
            if first.is_none() && !chunk.is_empty() {
                first = Some(due.elapsed());
            }
        }
        Ok::<_, reqwest::Error>((ok, first))
    }
    .await;
    let total = due.elapsed();
    let mut s = out.lock().await;
    match result {
        Ok((true, first)) => {
            s.total.push(total);
            if let Some(f) = first {
                s.ttfb.push(f);
            }
        }
        _ => s.errors += 1,
    }
}

#[tokio::main]
async fn main() {
    let args = Arc::new(Args::parse());
    // reqwest is built with rustls but no default provider (as in the product's main).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("HTTP client");
    let out = Arc::new(Mutex::new(Samples::default()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    if args.concurrent > 0 {
        for _ in 0..args.concurrent {
            tasks.push(tokio::spawn(one(
                http.clone(),
                args.clone(),
                Instant::now(),
                out.clone(),
            )));
        }
    } else {
        let n = (args.rate * args.secs).round() as u64;
        let every = Duration::from_secs_f64(1.0 / args.rate);
        for i in 0..n {
            let due = start + every * i as u32;
            tokio::time::sleep_until(due.into()).await;
            tasks.push(tokio::spawn(one(
                http.clone(),
                args.clone(),
                due,
                out.clone(),
            )));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut s = out.lock().await;
    let ok = s.total.len();
    let errors = s.errors;
    let mut line = format!(
        "{} ok={ok} errors={} rate={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        args.name,
        errors,
        ok as f64 / elapsed,
        pct(&mut s.total, 0.50),
        pct(&mut s.total, 0.99),
        pct(&mut s.total, 1.0),
    );
    if args.stream {
        line.push_str(&format!(
            " ttfb_p50_ms={:.2} ttfb_p99_ms={:.2}",
            pct(&mut s.ttfb, 0.50),
            pct(&mut s.ttfb, 0.99)
        ));
    }
    println!("{line}");
}
