# tokentally: one binary plus the default price book.
FROM rust:1.89-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake pkg-config zlib1g-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tokentally

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 tokentally \
    && mkdir -p /var/lib/tokentally && chown tokentally /var/lib/tokentally
COPY --from=build /src/target/release/tokentally /usr/local/bin/tokentally
COPY prices /app/prices
ENV TOKENTALLY_PRICES=/app/prices \
    TOKENTALLY_METRICS_LISTEN=0.0.0.0:9464
USER tokentally
WORKDIR /app
EXPOSE 9464 8090 9465
ENTRYPOINT ["tokentally"]
CMD ["run"]
