//! Dashboard pages, one module per page group. A handler parses (extractors), asks the
//! store, projects with `web::views` and renders with `page::respond`.

pub mod institutions;
pub mod models;
pub mod overview;
pub mod pipeline;
