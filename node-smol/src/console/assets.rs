//! The console's static files, compiled into the binary. They are hand-written (no build
//! step, no framework, no request to anywhere but this server) and contain no inline script
//! or style, so the strict policy in [`super::guard::HEADERS`] holds.

/// One embedded file.
pub(crate) struct Asset {
    /// The `content-type`.
    pub content_type: &'static str,
    /// The file.
    pub body: &'static str,
}

const INDEX: Asset = Asset {
    content_type: "text/html; charset=utf-8",
    body: include_str!("assets/index.html"),
};

/// The file served at `path` (query string already removed), if any.
pub(crate) fn get(path: &str) -> Option<Asset> {
    Some(match path {
        "/" | "/index.html" => INDEX,
        "/console/app.js" => Asset {
            content_type: "text/javascript; charset=utf-8",
            body: include_str!("assets/app.js"),
        },
        "/console/app.css" => Asset {
            content_type: "text/css; charset=utf-8",
            body: include_str!("assets/app.css"),
        },
        "/console/icon.svg" => Asset {
            content_type: "image/svg+xml",
            body: include_str!("assets/icon.svg"),
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_files_and_nothing_inline() {
        let html = get("/").map(|a| a.body).unwrap_or_default();
        assert!(html.contains(r#"<script src="/console/app.js" defer></script>"#));
        assert!(html.contains(r#"href="/console/app.css""#));
        for asset in [
            "/",
            "/console/app.js",
            "/console/app.css",
            "/console/icon.svg",
        ] {
            let body = get(asset).map(|a| a.body).unwrap_or_default();
            assert!(!body.is_empty(), "{asset}");
            // Nothing from elsewhere: no absolute URLs but the SVG namespace.
            let stripped = body.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !stripped.contains("http://") && !stripped.contains("https://"),
                "{asset}"
            );
            assert!(!stripped.contains("//cdn"), "{asset}");
        }
        // No inline script, handler attribute or style attribute: CSP would block them.
        let lower = html.to_ascii_lowercase();
        assert_eq!(lower.matches("<script").count(), 1);
        assert!(!lower.contains(" style="), "inline style attribute");
        assert!(!lower.contains("<style"), "inline style element");
        assert!(
            !lower.contains(" onclick=")
                && !lower.contains(" onload=")
                && !lower.contains(" onsubmit=")
        );
        assert!(get("/console/nope.js").is_none());
    }
}
