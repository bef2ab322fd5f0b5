//! The browser-facing rules of the whole admin port.
//!
//! Serving a web page on the admin port makes it reachable from any page a browser on the
//! operator's machine opens, so every admin request, API or console, goes through [`check`]:
//!
//! * **Cross-site requests.** A request that changes state (any method but `GET`) must carry
//!   [`CSRF_HEADER`] and a JSON content type. A cross-site HTML form can send neither, and a
//!   cross-site `fetch` that sends them needs a CORS preflight, which this server never
//!   grants. A browser's `Origin`, when present, must name the host the request went to.
//! * **DNS rebinding.** Without a token the admin port listens on loopback only (settings
//!   enforce it), and a rebinding page reaches it under its own host name; so without a token
//!   the `Host` must be an IP address or `localhost`.
//! * **Content.** Every response carries [`HEADERS`]: a strict Content-Security-Policy (only
//!   this server's own scripts, styles and images; no inline code; no framing), `nosniff`,
//!   no referrer, no caching.
//!
//! The token itself is checked by the admin module, as before; the console sends it as a
//! bearer header and never in a URL.

/// The header every state-changing request must carry (any non-empty value).
pub(crate) const CSRF_HEADER: &str = "x-ddpush-csrf";

/// Security headers on every admin response, each line ending in CRLF.
pub(crate) const HEADERS: &str = "content-security-policy: default-src 'self'; script-src 'self'; \
style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
form-action 'none'; frame-ancestors 'none'\r\n\
x-content-type-options: nosniff\r\n\
x-frame-options: DENY\r\n\
referrer-policy: no-referrer\r\n\
cross-origin-resource-policy: same-origin\r\n\
cache-control: no-store\r\n";

/// The request headers the rules look at.
#[derive(Debug, Default)]
pub(crate) struct BrowserHeaders<'a> {
    /// `Host`.
    pub host: Option<&'a str>,
    /// `Origin`.
    pub origin: Option<&'a str>,
    /// `Content-Type`.
    pub content_type: Option<&'a str>,
    /// Whether [`CSRF_HEADER`] is present with a non-empty value.
    pub csrf: bool,
}

/// Why a request was refused: an HTTP status and a message for the body.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// 403 or 415.
    pub status: u16,
    /// What to fix.
    pub msg: &'static str,
}

/// Applies the rules of the module docs. `token` says whether the admin port has a token.
pub(crate) fn check(method: &str, h: &BrowserHeaders, token: bool) -> Result<(), Refusal> {
    let refuse = |status, msg| Err(Refusal { status, msg });
    if !token && !h.host.is_none_or(host_is_address) {
        return refuse(
            403,
            "without --admin-token the Host must be an IP address or localhost",
        );
    }
    if let Some(origin) = h.origin {
        let same = h.host.is_some_and(|host| {
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .is_some_and(|o| o.eq_ignore_ascii_case(host))
        });
        if !same {
            return refuse(403, "cross-origin request refused");
        }
    }
    if method != "GET" {
        if !h.csrf {
            return refuse(
                403,
                "state-changing requests need the header x-ddpush-csrf: 1",
            );
        }
        let json = h.content_type.is_some_and(|c| {
            c.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
        if !json {
            return refuse(
                415,
                "state-changing requests need content-type: application/json",
            );
        }
    }
    Ok(())
}

/// `Host` names an IP literal (`127.0.0.1`, `[::1]`, with or without a port) or `localhost`.
fn host_is_address(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || port.starts_with(':') => {
                return v6.parse::<std::net::Ipv6Addr>().is_ok();
            }
            _ => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h<'a>(
        host: &'a str,
        origin: Option<&'a str>,
        ct: Option<&'a str>,
        csrf: bool,
    ) -> BrowserHeaders<'a> {
        BrowserHeaders {
            host: Some(host),
            origin,
            content_type: ct,
            csrf,
        }
    }

    #[test]
    fn reads_need_nothing_special() {
        assert_eq!(
            check("GET", &h("127.0.0.1:9900", None, None, false), false),
            Ok(())
        );
        assert_eq!(check("GET", &BrowserHeaders::default(), false), Ok(()));
    }

    #[test]
    fn writes_need_the_custom_header_and_json() {
        let json = Some("application/json; charset=utf-8");
        assert_eq!(
            check("POST", &h("127.0.0.1", None, json, true), false),
            Ok(())
        );
        let no_header = check("POST", &h("127.0.0.1", None, json, false), false);
        assert_eq!(no_header.map_err(|r| r.status), Err(403));
        for form in [
            Some("application/x-www-form-urlencoded"),
            Some("text/plain"),
            Some("multipart/form-data; boundary=x"),
            None,
        ] {
            let r = check("POST", &h("127.0.0.1", None, form, true), false);
            assert_eq!(r.map_err(|r| r.status), Err(415), "{form:?}");
        }
        // Any other method counts as a write too.
        let r = check("DELETE", &h("127.0.0.1", None, None, false), false);
        assert_eq!(r.map_err(|r| r.status), Err(403));
    }

    #[test]
    fn origin_must_match_host() {
        let json = Some("application/json");
        let same = h("127.0.0.1:9900", Some("http://127.0.0.1:9900"), json, true);
        assert_eq!(check("POST", &same, false), Ok(()));
        for bad in ["http://evil.example", "null", "http://127.0.0.1:9901"] {
            let r = check("POST", &h("127.0.0.1:9900", Some(bad), json, true), false);
            assert_eq!(r.map_err(|r| r.status), Err(403), "{bad}");
            let r = check("GET", &h("127.0.0.1:9900", Some(bad), None, false), true);
            assert_eq!(r.map_err(|r| r.status), Err(403), "{bad}");
        }
    }

    #[test]
    fn without_a_token_the_host_must_be_an_address() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9900",
            "[::1]:9900",
            "[::1]",
            "localhost:9900",
            "LOCALHOST",
        ] {
            assert_eq!(
                check("GET", &h(ok, None, None, false), false),
                Ok(()),
                "{ok}"
            );
        }
        for bad in [
            "evil.example",
            "evil.example:9900",
            "[::1]x",
            "127.0.0.1.nip.io:9900",
        ] {
            let r = check("GET", &h(bad, None, None, false), false);
            assert_eq!(r.map_err(|r| r.status), Err(403), "{bad}");
            // With a token, the token protects: any host name.
            assert_eq!(
                check("GET", &h(bad, None, None, false), true),
                Ok(()),
                "{bad}"
            );
        }
    }
}
