//! Pricer-only throughput: decode is excluded; `price(&event, &book)` over a realistic
//! mix of models against the default price book.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokentally::contract::decode::{decode, DecodeOptions};
use tokentally::emit::{EmitArgs, Generator};
use tokentally::price::{price, PriceBook};

fn bench(c: &mut Criterion) {
    let book = PriceBook::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/prices"
    )))
    .unwrap();
    let now = chrono::Utc::now();
    let args = EmitArgs {
        count: 0,
        rate: 0,
        from: None,
        to: None,
        seed: 3,
        institutions: 8,
        duplicates: 0.0,
        malformed: 0.0,
        unknown_models: 0.01,
        partitions: 1,
    };
    let mut g = Generator::new(&args, now).unwrap();
    let opts = DecodeOptions {
        now,
        max_future_skew: chrono::Duration::minutes(5),
    };
    let payloads: Vec<Vec<u8>> = (0..10_000).map(|_| g.next_message().payload).collect();
    let events: Vec<_> = payloads.iter().map(|p| decode(p, &opts).unwrap()).collect();

    let mut group = c.benchmark_group("pipeline_stages");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("price_10k_events", |b| {
        b.iter(|| {
            events
                .iter()
                .map(|e| price(e, &book))
                .filter(|p| matches!(p, tokentally::price::Pricing::Priced(_)))
                .count()
        })
    });
    group.bench_function("decode_10k_messages", |b| {
        b.iter(|| payloads.iter().filter(|p| decode(p, &opts).is_ok()).count())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
