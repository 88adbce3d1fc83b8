//! The smallest HTTP/1.1 client that tailscaled's LocalAPI needs: one GET per connection over
//! a unix socket (`Connection: close`), a response read whole into memory under a size bound,
//! `Content-Length` or chunked bodies.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// One HTTP response.
#[derive(Debug)]
pub(crate) struct Response {
    /// Status code.
    pub status: u16,
    /// The decoded body.
    pub body: Vec<u8>,
}

/// Ways a request can fail below HTTP.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    /// The socket could not be reached.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// Reading or writing failed.
    #[error("i/o: {0}")]
    Io(std::io::Error),
    /// The whole exchange took longer than its deadline.
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    /// The response is larger than the bound.
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    /// The response is not HTTP/1.x as we read it.
    #[error("malformed HTTP response: {0}")]
    Malformed(&'static str),
}

/// Sends `GET path` with `host` as the Host header to the unix socket at `socket`, and reads
/// the whole response (at most `max` bytes on the wire) within `deadline`.
pub(crate) async fn get(
    socket: &Path,
    host: &str,
    path_and_query: &str,
    deadline: Duration,
    max: usize,
) -> Result<Response, HttpError> {
    tokio::time::timeout(deadline, async {
        let mut stream = UnixStream::connect(socket)
            .await
            .map_err(HttpError::Connect)?;
        let req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: clawmesh/{}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
            env!("CARGO_PKG_VERSION")
        );
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(HttpError::Io)?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = stream.read(&mut buf).await.map_err(HttpError::Io)?;
            if n == 0 {
                break;
            }
            if raw.len() + n > max {
                return Err(HttpError::TooLarge(max));
            }
            raw.extend_from_slice(&buf[..n]);
            // A response with a complete framed body need not wait for the close.
            if let Some(resp) = parse(&raw)? {
                return Ok(resp);
            }
        }
        parse_to_eof(&raw)
    })
    .await
    .map_err(|_| HttpError::Timeout(deadline))?
}

/// A response head: status, headers (lower-case names) and where the body starts.
type Head = (u16, Vec<(String, String)>, usize);

/// Splits head and body; `None` while the head is incomplete.
fn head(raw: &[u8]) -> Result<Option<Head>, HttpError> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&raw[..end]).map_err(|_| HttpError::Malformed("head"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().ok_or(HttpError::Malformed("status line"))?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed("not HTTP/1.x"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(HttpError::Malformed("status code"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Some((status, headers, end + 4)))
}

/// A complete response if the body is framed and fully read; `None` if more bytes are needed.
fn parse(raw: &[u8]) -> Result<Option<Response>, HttpError> {
    let Some((status, headers, start)) = head(raw)? else {
        return Ok(None);
    };
    let resp = |body| Response { status, body };
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let rest = &raw[start..];
    if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        return Ok(dechunk(rest)?.map(resp));
    }
    if let Some(len) = find("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| HttpError::Malformed("content-length"))?;
        return Ok((rest.len() >= len).then(|| resp(rest[..len].to_vec())));
    }
    Ok(None)
}

/// The response once the server closed: a body without framing runs to the end.
fn parse_to_eof(raw: &[u8]) -> Result<Response, HttpError> {
    if let Some(resp) = parse(raw)? {
        return Ok(resp);
    }
    let (status, headers, start) = head(raw)?.ok_or(HttpError::Malformed("truncated head"))?;
    let framed = headers
        .iter()
        .any(|(n, _)| n == "content-length" || n == "transfer-encoding");
    if framed {
        return Err(HttpError::Malformed("truncated body"));
    }
    Ok(Response {
        status,
        body: raw[start..].to_vec(),
    })
}

/// Decodes a chunked body; `None` until the last chunk has arrived.
fn dechunk(mut rest: &[u8]) -> Result<Option<Vec<u8>>, HttpError> {
    let mut body = Vec::new();
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_text =
            std::str::from_utf8(&rest[..eol]).map_err(|_| HttpError::Malformed("chunk size"))?;
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(size_hex, 16).map_err(|_| HttpError::Malformed("chunk size"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(Some(body));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_and_chunked_bodies() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabc")
            .unwrap()
            .is_none());
        let r = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.body, b"abcde");
        assert!(
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab")
                .unwrap()
                .is_none()
        );
        let r = parse_to_eof(b"HTTP/1.0 404 Not Found\r\n\r\nnope\n").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"nope\n"[..]));
        assert!(parse_to_eof(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc").is_err());
        assert!(parse(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
    }
}
