//! What a proxy changes in the head of a request and a response (RFC 9110 §7.6):
//! connection-specific fields are dropped, `Forwarded` / `X-Forwarded-*` are set, and
//! the request target takes the form the upstream protocol wants.

use std::{net::SocketAddr, sync::Arc};

use bytes::{Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Uri,
    header::{CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE},
    uri::{Authority, PathAndQuery, Scheme},
};

use crate::pool::Protocol;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Is this a protocol upgrade (WebSocket): `Connection: upgrade` with an `Upgrade`?
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE) && connection_has(headers, "upgrade")
}

/// Whether the only protocol an upgrade offers is HTTP/2 (`Upgrade: h2c`, as
/// `curl --http2` sends): an offer a server may ignore, unlike a WebSocket's.
pub fn offers_only_h2c(headers: &HeaderMap) -> bool {
    let mut offers = headers
        .get_all(UPGRADE)
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .filter(|offer| !offer.is_empty())
        .peekable();
    offers.peek().is_some() && offers.all(|offer| offer.eq_ignore_ascii_case("h2c"))
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    list_has(headers, CONNECTION, token)
}

/// Whether a list field (`Connection`, `TE`) names `token`, in any of its fields.
pub fn list_has(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',').any(|t| {
                // A token may carry parameters (`gzip;q=0.5`): the name is before them.
                let t = t.split(';').next().unwrap_or(t);
                t.trim().eq_ignore_ascii_case(token)
            })
        })
    })
}

/// A message's transfer codings (`Transfer-Encoding`, RFC 9112 §6.1), as a proxy that
/// reads chunked and nothing else sees them. `identity`, no coding at all, which older
/// servers still send, counts as none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferCodings {
    /// How many times chunked is named: once is how a body of unknown length is
    /// framed; twice is malformed.
    pub chunked: usize,
    /// The first coding besides chunked (`gzip` of `gzip, chunked`), which would be
    /// lost once the chunks are taken off: the body would go on as plain bytes.
    pub other: Option<String>,
}

pub fn transfer_codings(headers: &HeaderMap) -> TransferCodings {
    let mut codings = TransferCodings::default();
    let named = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .filter(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case("identity"));
    for coding in named {
        if coding.eq_ignore_ascii_case("chunked") {
            codings.chunked += 1;
        } else if codings.other.is_none() {
            codings.other = Some(coding.to_owned());
        }
    }
    codings
}

/// Drops the fields that belong to one connection: `Connection` and every field it
/// names, `Keep-Alive`, `Proxy-Connection`, `TE` (but `TE: trailers`), and
/// `Transfer-Encoding`; `Upgrade` too, unless the exchange is being upgraded, when
/// `Connection: upgrade` and `Upgrade` go on to the next hop.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most heads carry none of them: one pass over the names instead of a lookup each.
    if !upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Looked for first: a client may name TE in `Connection` too, as RFC 9110 §10.1.4
    // asks of one that sends it.
    let trailers = list_has(headers, TE, "trailers");
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            if !(upgrade && name == UPGRADE) {
                headers.remove(&name);
            }
        }
        headers.remove(CONNECTION);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(TRANSFER_ENCODING);
    // `trailers` is the one TE value that means end to end ("I accept trailers"); the
    // codings a client accepts are for this hop only, in any of its TE fields.
    headers.remove(TE);
    if trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    [CONNECTION, TE, TRANSFER_ENCODING, UPGRADE].contains(name)
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// A client connection's address, with the forwarded-field values made from it once
/// per connection rather than once per request.
#[derive(Debug, Clone)]
pub struct ClientAddress {
    pub addr: SocketAddr,
    /// `for=192.0.2.1;proto=http` (or `for="[2001:db8::1]";proto=http`).
    forwarded: HeaderValue,
    /// The bare address, for `X-Forwarded-For`.
    ip: HeaderValue,
    /// The connection's place under the server's connection bound, kept as long as
    /// this is: by the connection's exchanges, and by a tunnel its upgrade became.
    place: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl ClientAddress {
    pub fn new(addr: SocketAddr) -> Self {
        // An IPv4 client of a dual-stack listener is `::ffff:a.b.c.d`: told as IPv4.
        let ip = addr.ip().to_canonical();
        let node = if ip.is_ipv6() {
            format!("\"[{ip}]\"")
        } else {
            ip.to_string()
        };
        Self {
            addr,
            forwarded: header_value(format!("for={node};proto=http").into()),
            ip: header_value(ip.to_string().into()),
            place: None,
        }
    }

    /// The same, keeping `place` (see the field) while it lives.
    pub fn holding(mut self, place: impl std::any::Any + Send + Sync) -> Self {
        self.place = Some(Arc::new(place));
        self
    }
}

/// Addresses and the fields made of them are always valid header values.
fn header_value(bytes: Bytes) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Records the client and the host it asked for: `Forwarded` (RFC 7239) and the
/// `X-Forwarded-*` fields many servers read, added to whatever earlier proxies set.
/// `host` is the request's own value (a cheap clone of the bytes it arrived in).
///
/// `X-Forwarded-Host` and `X-Forwarded-Proto` already set are kept: in front of the
/// activator there is mostly an ingress that terminated TLS and says so, and replacing
/// its `https` would make functions build `http` links. Kept, they are only as
/// trustworthy as the client: the activator adds no boundary here, since a function
/// with ready replicas is reached without it (transparent mode) with whatever fields
/// the client sends. `Forwarded` and `X-Forwarded-For` always end with what the
/// activator saw itself.
pub fn add_forwarded(headers: &mut HeaderMap, client: &ClientAddress, host: Option<&HeaderValue>) {
    let forwarded = match host.map(|h| (h, forwarded_host_form(h.as_bytes()))) {
        Some((host, Some(form))) => {
            let mut element = BytesMut::with_capacity(client.forwarded.len() + 8 + host.len());
            element.extend_from_slice(client.forwarded.as_bytes());
            element.extend_from_slice(b";host=");
            // A value is a token or a quoted string (RFC 7239 §4): `f.example` as it
            // is, `"f.example:8080"` and `"[2001:db8::1]"` quoted.
            match form {
                HostForm::Token => element.extend_from_slice(host.as_bytes()),
                HostForm::Quoted => {
                    element.extend_from_slice(b"\"");
                    element.extend_from_slice(host.as_bytes());
                    element.extend_from_slice(b"\"");
                }
            }
            header_value(element.freeze())
        }
        _ => client.forwarded.clone(),
    };
    // Room for the four fields at once, rather than the map growing twice.
    headers.reserve(4);
    append_list(headers, &FORWARDED, forwarded);
    append_list(headers, &X_FORWARDED_FOR, client.ip.clone());
    if let Some(host) = host {
        headers
            .entry(&X_FORWARDED_HOST)
            .or_insert_with(|| host.clone());
    }
    headers
        .entry(&X_FORWARDED_PROTO)
        .or_insert_with(|| HeaderValue::from_static("http"));
}

/// How a host goes into `Forwarded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostForm {
    Token,
    Quoted,
}

/// The form `host` (a name or an address, with its port) takes in `Forwarded`; none
/// when it is not a host, and is left out of that field. One pass, one table look-up a
/// byte: it runs for every request.
fn forwarded_host_form(host: &[u8]) -> Option<HostForm> {
    let mut form = HostForm::Token;
    for &byte in host {
        match HOST_BYTES[usize::from(byte)] {
            TOKEN => {}
            QUOTED => form = HostForm::Quoted,
            _ => return None,
        }
    }
    (!host.is_empty()).then_some(form)
}

const NOT_HOST: u8 = 0;
/// A host byte that is an RFC 9110 `tchar` too: letters, digits, `-`, `.`, `_`.
const TOKEN: u8 = 1;
/// A host byte that is not a `tchar` (`:` of a port, `[` and `]` of an IPv6 address):
/// the host is quoted.
const QUOTED: u8 = 2;
static HOST_BYTES: [u8; 256] = {
    let mut table = [NOT_HOST; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        table[byte] = if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_') {
            TOKEN
        } else if matches!(b, b':' | b'[' | b']') {
            QUOTED
        } else {
            NOT_HOST
        };
        byte += 1;
    }
    table
};

/// Adds `value` to a comma-separated list field (earlier proxies' entries first).
fn append_list(headers: &mut HeaderMap, name: &HeaderName, value: HeaderValue) {
    match headers.entry(name) {
        http::header::Entry::Occupied(mut entry) => {
            // Every earlier field of the name, in order, then this one.
            let mut joined = BytesMut::new();
            for existing in entry.iter() {
                joined.extend_from_slice(existing.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(value.as_bytes());
            entry.insert(header_value(joined.freeze()));
        }
        http::header::Entry::Vacant(entry) => {
            entry.insert(value);
        }
    }
}

/// Gives a request that is about to wait its own copies of its target and field
/// values. hyper parses them as slices of the connection's 8 KiB read buffer, and the
/// slices keep that buffer alive; while the request waits, hyper reads the connection
/// again (to notice a client that leaves), and with the buffer still shared that read
/// takes a second 8 KiB. Copied (a few hundred bytes), the read reuses the first.
/// Whatever cannot be copied as it is stays shared: only memory is at stake.
pub fn detach_from_read_buffer<B>(request: &mut http::Request<B>) {
    if let Ok(copy) = Uri::try_from(request.uri().to_string()) {
        *request.uri_mut() = copy;
    }
    for value in request.headers_mut().values_mut() {
        if let Ok(mut copy) = HeaderValue::from_bytes(value.as_bytes()) {
            copy.set_sensitive(value.is_sensitive());
            *value = copy;
        }
    }
}

/// Why a request names no one host; the message is the 400's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoHost {
    /// No authority in its target and no (readable) `Host` field.
    #[error("the request names no host (no Host field or authority)")]
    Missing,
    /// More than one `Host` field (RFC 9112 §3.2: answered 400). Routed by one and
    /// read by the replica by another, it would reach a function that did not ask
    /// for it.
    #[error("the request has more than one Host field")]
    Repeated,
    /// The target's authority carries userinfo (`user:pass@host`), which RFC 9110
    /// §4.2.4 has a recipient treat as an error: it mostly hides the real host.
    #[error("the request target's authority carries userinfo (user@host)")]
    Userinfo,
}

/// The host a request asked for: the target's authority when it has one (an
/// absolute-form target, HTTP/2's `:authority`), which then wins over `Host` (RFC 9112
/// §3.2.2), else the one `Host` field.
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Result<&'a str, NoHost> {
    let mut fields = headers.get_all(HOST).iter();
    let host = fields.next().and_then(|h| h.to_str().ok());
    if fields.next().is_some() {
        return Err(NoHost::Repeated);
    }
    match uri.authority() {
        Some(authority) if authority.as_str().contains('@') => Err(NoHost::Userinfo),
        Some(authority) => Ok(authority.as_str()),
        None => host.ok_or(NoHost::Missing),
    }
}

/// The same, as a header value of its own: the authority's copied, or the `Host`
/// field's bytes shared. Called once [`request_host`] has accepted the request.
pub fn request_host_value(uri: &Uri, headers: &HeaderMap) -> Option<HeaderValue> {
    match uri.authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => headers.get(HOST).cloned(),
    }
}

/// The `Host` field for the upstream: the request's host for HTTP/1.1 (a client
/// speaking HTTP/2 sends none; an absolute-form target's authority replaces the
/// client's field), none for h2c, where the authority carries it. `from_target`: the
/// host is the request target's authority, not its `Host` field.
pub fn set_upstream_host(
    headers: &mut HeaderMap,
    host: Option<&HeaderValue>,
    from_target: bool,
    protocol: Protocol,
) {
    match protocol {
        Protocol::Http1 => {
            // Taken from the field, the host is already in place.
            if let Some(value) = host
                && (from_target || !headers.contains_key(HOST))
            {
                headers.insert(HOST, value.clone());
            }
        }
        Protocol::H2c => {
            headers.remove(HOST);
        }
    }
}

/// The request target for the upstream, when it is not `uri` as it is: origin-form
/// (`/path?query`) for HTTP/1.1; absolute-form (scheme and authority, which HTTP/2
/// sends as pseudo-headers) for h2c.
pub fn upstream_target(uri: &Uri, host: Option<&HeaderValue>, protocol: Protocol) -> Option<Uri> {
    match protocol {
        // Origin-form already, as an HTTP/1.1 client sends it.
        Protocol::Http1 if uri.scheme().is_none() && uri.authority().is_none() => None,
        Protocol::Http1 => Some(Uri::from(origin_form_path(uri))),
        Protocol::H2c => {
            let authority = host
                .and_then(|h| Authority::try_from(h.as_bytes()).ok())
                .unwrap_or_else(|| Authority::from_static("localhost"));
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(authority);
            parts.path_and_query = Some(origin_form_path(uri));
            Uri::from_parts(parts).ok()
        }
    }
}

/// The path and query of `uri`, `/` when it has none (an authority-form target), and
/// `/?q` for an absolute target with a query but no path (`http://f.example?q`, which
/// `http` keeps as `?q`).
fn origin_form_path(uri: &Uri) -> PathAndQuery {
    match uri.path_and_query() {
        Some(pq) if pq.as_str().starts_with('?') => {
            PathAndQuery::try_from(format!("/{}", pq.as_str())).unwrap_or_else(|_| pq.clone())
        }
        Some(pq) => pq.clone(),
        None => PathAndQuery::from_static("/"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head parsed the way hyper parses one: target and values are slices of the
    /// connection's read buffer. Detached, the request no longer holds the buffer.
    #[test]
    fn a_detached_head_no_longer_holds_the_read_buffer() {
        let buffer = Bytes::copy_from_slice(b"/items?id=7 burst.fns secret");
        let mut request = http::Request::new(());
        *request.uri_mut() = Uri::from_maybe_shared(buffer.slice(0..11)).expect("uri");
        let host = HeaderValue::from_maybe_shared(buffer.slice(12..21)).expect("host");
        let mut secret = HeaderValue::from_maybe_shared(buffer.slice(22..)).expect("value");
        secret.set_sensitive(true);
        request.headers_mut().insert(HOST, host);
        request.headers_mut().insert("authorization", secret);
        assert!(!buffer.is_unique(), "the parsed head shares the buffer");

        detach_from_read_buffer(&mut request);

        assert!(
            buffer.is_unique(),
            "the detached head still shares the buffer"
        );
        assert_eq!(request.uri(), "/items?id=7");
        assert_eq!(request.headers()[HOST], "burst.fns");
        assert_eq!(request.headers()["authorization"], "secret");
        assert!(request.headers()["authorization"].is_sensitive());
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut n: Vec<String> = h.keys().map(|k| k.to_string()).collect();
        n.sort();
        n
    }

    #[test]
    fn hop_by_hop_fields_go() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "h2c"),
            ("trailer", "x-checksum"),
            ("x-kept", "1"),
        ]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["trailer", "x-kept"]);
    }

    #[test]
    fn te_trailers_stays_alone() {
        for fields in [
            &[("te", "trailers")][..],
            &[("te", "gzip;q=0.5, Trailers")],
            &[("te", "gzip"), ("te", "trailers")],
            &[("connection", "TE"), ("te", "trailers")],
        ] {
            let mut h = headers(fields);
            remove_hop_by_hop(&mut h, false);
            assert_eq!(
                h.get_all(TE).iter().collect::<Vec<_>>(),
                ["trailers"],
                "{fields:?}"
            );
        }
    }

    #[test]
    fn transfer_codings_are_counted_and_others_named() {
        let codings = |chunked, other: Option<&str>| TransferCodings {
            chunked,
            other: other.map(str::to_owned),
        };
        for (fields, expected) in [
            (&[("transfer-encoding", "chunked")][..], codings(1, None)),
            (&[("transfer-encoding", " Chunked ")], codings(1, None)),
            (&[("transfer-encoding", "identity")], codings(0, None)),
            (
                &[("transfer-encoding", "gzip, chunked")],
                codings(1, Some("gzip")),
            ),
            (
                &[
                    ("transfer-encoding", "gzip"),
                    ("transfer-encoding", "chunked"),
                ],
                codings(1, Some("gzip")),
            ),
            (
                &[("transfer-encoding", "chunked, chunked")],
                codings(2, None),
            ),
            (&[], codings(0, None)),
        ] {
            assert_eq!(transfer_codings(&headers(fields)), expected, "{fields:?}");
        }
    }

    #[test]
    fn the_host_is_the_authority_or_the_one_host_field() {
        let host = |uri: &str, fields: &[(&str, &str)]| {
            let uri: Uri = uri.parse().expect("uri");
            let fields = headers(fields);
            request_host(&uri, &fields).map(str::to_owned)
        };
        assert_eq!(
            host("/a", &[("host", "f.example")]).as_deref(),
            Ok("f.example")
        );
        // An absolute-form target's authority wins over the field (RFC 9112 §3.2.2).
        assert_eq!(
            host("http://g.example/a", &[("host", "f.example")]).as_deref(),
            Ok("g.example")
        );
        assert_eq!(host("/a", &[]), Err(NoHost::Missing));
        for target in ["/a", "http://g.example/a"] {
            assert_eq!(
                host(target, &[("host", "f.example"), ("host", "g.example")]),
                Err(NoHost::Repeated)
            );
        }
        assert_eq!(
            host("http://u:p@g.example/a", &[("host", "g.example")]),
            Err(NoHost::Userinfo)
        );
        let uri: Uri = "http://g.example/a".parse().expect("uri");
        assert_eq!(
            request_host_value(&uri, &headers(&[("host", "f.example")])),
            Some(HeaderValue::from_static("g.example"))
        );
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_connection() {
        let mut h = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        assert!(is_upgrade(&h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(names(&h), ["connection", "sec-websocket-key", "upgrade"]);
        assert_eq!(h[CONNECTION], "upgrade");
        assert!(!is_upgrade(&headers(&[("upgrade", "websocket")])));
    }

    #[test]
    fn forwarded_fields_are_added_to_earlier_ones() {
        let mut h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("forwarded", "for=1.2.3.4"),
        ]);
        add_forwarded(
            &mut h,
            &ClientAddress::new("10.0.0.9:5555".parse().expect("addr")),
            Some(&HeaderValue::from_static("f.example:8080")),
        );
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 5.6.7.8, 10.0.0.9");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        // Not a token (`:`): quoted (RFC 7239 §4).
        assert_eq!(
            h["forwarded"],
            "for=1.2.3.4, for=10.0.0.9;proto=http;host=\"f.example:8080\""
        );
        assert_eq!(h["x-forwarded-host"], "f.example:8080");
        let mut h = HeaderMap::new();
        add_forwarded(
            &mut h,
            &ClientAddress::new("10.0.0.9:5555".parse().expect("addr")),
            Some(&HeaderValue::from_static("f.example")),
        );
        assert_eq!(h["forwarded"], "for=10.0.0.9;proto=http;host=f.example");
        for (host, form) in [
            ("f.example", Some(HostForm::Token)),
            ("f.example:8080", Some(HostForm::Quoted)),
            ("[2001:db8::1]:80", Some(HostForm::Quoted)),
            ("f example", None),
            ("f\"example", None),
            ("", None),
        ] {
            assert_eq!(forwarded_host_form(host.as_bytes()), form, "{host:?}");
        }
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut h = HeaderMap::new();
        add_forwarded(
            &mut h,
            &ClientAddress::new("[::1]:5555".parse().expect("addr")),
            None,
        );
        assert_eq!(h["forwarded"], "for=\"[::1]\";proto=http");
        // An IPv4 client of a dual-stack listener.
        let mut h = HeaderMap::new();
        add_forwarded(
            &mut h,
            &ClientAddress::new("[::ffff:10.0.0.9]:5555".parse().expect("addr")),
            None,
        );
        assert_eq!(h["forwarded"], "for=10.0.0.9;proto=http");
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
    }

    #[test]
    fn an_offer_of_http2_alone_may_be_ignored() {
        for (upgrade, only_h2c) in [
            (&["h2c"][..], true),
            (&["H2C"][..], true),
            (&["websocket"][..], false),
            (&["h2c, websocket"][..], false),
            (&["h2c", "websocket"][..], false),
            (&[][..], false),
        ] {
            let fields: Vec<_> = upgrade.iter().map(|u| ("upgrade", *u)).collect();
            assert_eq!(offers_only_h2c(&headers(&fields)), only_h2c, "{upgrade:?}");
        }
    }

    #[test]
    fn targets_per_protocol() {
        let host = HeaderValue::from_static("f.example");
        let target = |uri: &str, protocol| {
            let uri: Uri = uri.parse().expect("uri");
            upstream_target(&uri, Some(&host), protocol).map(|t| t.to_string())
        };
        assert_eq!(
            target("http://f.example/a?b=1", Protocol::Http1).as_deref(),
            Some("/a?b=1")
        );
        // Origin-form stays as it came.
        assert_eq!(target("/c/d?e", Protocol::Http1), None);
        // Authority-form (CONNECT's) has no path: the replica gets `/`.
        assert_eq!(
            target("f.example:80", Protocol::Http1).as_deref(),
            Some("/")
        );
        assert_eq!(
            target("/a", Protocol::H2c).as_deref(),
            Some("http://f.example/a")
        );
        assert_eq!(
            target("http://other.example:8080/a", Protocol::H2c).as_deref(),
            Some("http://f.example/a")
        );
        // An absolute target with a query and no path.
        assert_eq!(
            target("http://f.example?x=1", Protocol::Http1).as_deref(),
            Some("/?x=1")
        );
        assert_eq!(
            target("http://f.example?x=1", Protocol::H2c).as_deref(),
            Some("http://f.example/?x=1")
        );
    }

    #[test]
    fn the_host_field_goes_to_http1_replicas_only() {
        let host = HeaderValue::from_static("f.example:8080");
        let mut h = HeaderMap::new();
        set_upstream_host(&mut h, Some(&host), false, Protocol::Http1);
        assert_eq!(h[HOST], "f.example:8080");
        // The request's host is its target's authority when it has one: it replaces
        // the client's field.
        let mut h = headers(&[("host", "mine.example")]);
        set_upstream_host(&mut h, Some(&host), true, Protocol::Http1);
        assert_eq!(h[HOST], "f.example:8080");
        assert_eq!(h.get_all(HOST).iter().count(), 1);
        set_upstream_host(&mut h, Some(&host), true, Protocol::H2c);
        assert!(!h.contains_key(HOST));
    }
}
