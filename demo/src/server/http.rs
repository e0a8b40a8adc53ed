//! HTTP/1.1 for the workers: requests parsed with `httparse`, plain responses, keep-alive.

use std::io::{self, Read, Write};
use std::net::TcpStream;

/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// One parsed request: its target and whether the connection stays open after the answer.
struct Head {
    path: String,
    keep_alive: bool,
    /// Bytes of the head plus its body, to be consumed from the buffer.
    length: usize,
}

fn header<'a>(headers: &'a [httparse::Header<'_>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|header| header.name.eq_ignore_ascii_case(name))
        .and_then(|header| std::str::from_utf8(header.value).ok())
        .map(str::trim)
}

/// `Ok(None)` when more bytes are needed.
fn parse(buffer: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buffer) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(head_length)) => {
            let connection = header(request.headers, "connection");
            let keep_alive = match connection {
                Some(value) if value.eq_ignore_ascii_case("close") => false,
                Some(value) if value.eq_ignore_ascii_case("keep-alive") => true,
                _ => request.version == Some(1),
            };
            let body = match header(request.headers, "content-length") {
                Some(value) => value
                    .parse::<usize>()
                    .map_err(|_| String::from("bad Content-Length"))?,
                None => 0,
            };
            Ok(Some(Head {
                path: request.path.unwrap_or("/").to_owned(),
                keep_alive,
                length: head_length + body,
            }))
        }
        Err(error) => Err(error.to_string()),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Internal Server Error",
    }
}

fn respond(stream: &mut TcpStream, status: u16, body: &str, keep_alive: bool) -> io::Result<()> {
    let connection = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    let response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n{body}",
        reason(status),
        body.len()
    );
    stream.write_all(response.as_bytes())
}

/// Serves the requests of one connection until the client closes it, asks to, or errs.
/// `handle` gets the request target and returns the status and body.
pub fn serve_connection(
    mut stream: TcpStream,
    mut handle: impl FnMut(&str) -> (u16, String),
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0_u8; 4096];
    loop {
        let head = loop {
            match parse(&buffer) {
                Ok(Some(head)) if buffer.len() >= head.length => break head,
                Ok(_) if buffer.len() > MAX_HEAD => {
                    return respond(&mut stream, 400, "request too large\n", false);
                }
                Ok(_) => {}
                Err(error) => return respond(&mut stream, 400, &format!("{error}\n"), false),
            }
            let read = stream.read(&mut chunk)?;
            if read == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..read]);
        };
        buffer.drain(..head.length);
        let (status, body) = handle(&head.path);
        respond(&mut stream, status, &body, head.keep_alive)?;
        if !head.keep_alive {
            return Ok(());
        }
    }
}
