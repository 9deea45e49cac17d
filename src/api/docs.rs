//! Swagger UI at `/docs`, from files vendored out of the npm package `swagger-ui-dist` (see
//! static/swagger-ui/VENDORED.md) and embedded in the binary, so it needs no disk or network.

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};

const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../static/swagger-ui/index.html"),
    ),
    (
        "swagger-ui.css",
        "text/css; charset=utf-8",
        include_bytes!("../../static/swagger-ui/swagger-ui.css"),
    ),
    (
        "swagger-ui-bundle.js",
        "application/javascript; charset=utf-8",
        include_bytes!("../../static/swagger-ui/swagger-ui-bundle.js"),
    ),
    (
        "favicon-32x32.png",
        "image/png",
        include_bytes!("../../static/swagger-ui/favicon-32x32.png"),
    ),
];

fn asset(name: &str) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, mime, bytes)) => (
            [
                (header::CONTENT_TYPE, *mime),
                (header::CACHE_CONTROL, "public, max-age=3600"),
            ],
            *bytes,
        )
            .into_response(),
        None => {
            super::error::ApiError::RouteNotFound(format!("no file /docs/{name}")).into_response()
        }
    }
}

pub async fn index() -> Response {
    asset("index.html")
}

pub async fn file(Path(name): Path<String>) -> Response {
    asset(&name)
}
