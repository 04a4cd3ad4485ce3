use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tokentally::cli::Cli::parse();
    tokentally::cli::init_tracing(cli.log_json);
    // TLS for webhooks and SMTP: rustls with the ring provider (no C toolchain needed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the async runtime");
    match runtime.block_on(tokentally::cli::dispatch(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
