//! The web UI at `/`: a page that drives /generate, /edit, /finetune and /adapters from a
//! browser. Its files (static/ui, plain ES modules with no build step) are embedded in the
//! binary like Swagger UI's, so the page works on a machine without network access.

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};

const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../static/ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../static/ui/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../static/ui/style.css"),
    ),
];

/// Only the page's own files may run or be fetched: it shows prompts, job records and error
/// messages from the server, and even if one of them were ever inserted as markup it could not
/// load or send anything elsewhere. Images are data: URLs, downloads blob: URLs.
const CSP: &str = concat!(
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; ",
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
);

fn asset(name: &str) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, mime, bytes)) => (
            [
                (header::CONTENT_TYPE, *mime),
                // The files change with the binary; revalidating keeps an upgraded server from
                // running an old page against its new API.
                (header::CACHE_CONTROL, "no-cache"),
                (header::CONTENT_SECURITY_POLICY, CSP),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *bytes,
        )
            .into_response(),
        None => {
            super::error::ApiError::RouteNotFound(format!("no file /ui/{name}")).into_response()
        }
    }
}

pub async fn index() -> Response {
    asset("index.html")
}

pub async fn file(Path(name): Path<String>) -> Response {
    asset(&name)
}
