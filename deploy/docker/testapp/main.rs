//! kith-testapp: a stand-in application for the Docker example and its end-to-end test. The
//! images there are `FROM scratch` (nothing can be pulled), so there is no shell, curl or
//! nginx: this one static program plays both apps. Standard library only, built with
//!
//!     rustc --edition 2024 -C target-feature=+crt-static -C strip=symbols -O -o kith-testapp main.rs
//!
//! - `kith-testapp serve <listen>[,<listen>…] <name>`: a tiny HTTP/1.1 server on each address;
//!   every request gets `200` and the body `<name> got <METHOD> <path>: <request body>`, so a
//!   caller can see which app answered and that its bytes crossed unchanged.
//! - `kith-testapp pause`: does nothing until killed (the pod runner's network-namespace
//!   holder, as a kubelet's pause container).
//! - `kith-testapp call <addr> <METHOD> <path> [body]`: one request (`Connection: close`);
//!   prints the status line, a blank line and the body. Exit 0 on any HTTP answer, 1 when the
//!   connection fails or closes without one (an mTLS refusal looks like that).
//!
//! Not part of the kith binary or the workspace: it is test scaffolding, never shipped.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

/// Largest request or response body accepted.
const MAX_BODY: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", listen, name] => serve(listen, name),
        ["call", addr, method, path] => call(addr, method, path, ""),
        ["call", addr, method, path, body] => call(addr, method, path, body),
        ["pause"] => loop {
            std::thread::park();
        },
        _ => Err(io::Error::other(
            "usage: kith-testapp serve <listen>[,<listen>…] <name> | call <addr> <METHOD> <path> [body] | pause",
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kith-testapp: {e}");
            ExitCode::from(1)
        }
    }
}

fn serve(listen: &str, name: &str) -> io::Result<()> {
    let (first, rest) = listen.split_once(',').unwrap_or((listen, ""));
    if !rest.is_empty() {
        let (rest, name) = (rest.to_owned(), name.to_owned());
        std::thread::spawn(move || {
            if let Err(e) = serve(&rest, &name) {
                eprintln!("kith-testapp {name}: {rest}: {e}");
                std::process::exit(1);
            }
        });
    }
    let listener = TcpListener::bind(first)?;
    eprintln!(
        "kith-testapp {name} listening on {}",
        listener.local_addr()?
    );
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let name = name.to_owned();
        std::thread::spawn(move || {
            if let Err(e) = answer(stream, &name) {
                eprintln!("kith-testapp {name}: {e}");
            }
        });
    }
    Ok(())
}

fn answer(stream: TcpStream, name: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let (start, length) = read_head(&mut reader)?;
    let mut parts = start.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("?"), parts.next().unwrap_or("?"));
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let reply = format!(
        "{name} got {method} {path}: {}",
        String::from_utf8_lossy(&body)
    );
    eprintln!("kith-testapp {name}: {method} {path} ({length} bytes)");
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
        reply.len()
    )?;
    stream.flush()
}

fn call(addr: &str, method: &str, path: &str, body: &str) -> io::Result<()> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| io::Error::other(format!("{addr}: {e}")))?;
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    let mut reader = BufReader::new(stream);
    let (status, length) = read_head(&mut reader)?;
    let mut answer = Vec::new();
    // Servers that send no content-length (the sidecars' admin endpoint does) end at EOF.
    if length > 0 {
        answer.resize(length, 0);
        reader.read_exact(&mut answer)?;
    } else {
        reader.take(MAX_BODY as u64).read_to_end(&mut answer)?;
    }
    println!("{status}\n\n{}", String::from_utf8_lossy(&answer));
    Ok(())
}

/// Reads the start line and the headers; returns the start line and the content length.
fn read_head(reader: &mut impl BufRead) -> io::Result<(String, usize)> {
    let mut start = String::new();
    if reader.read_line(&mut start)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed without an answer",
        ));
    }
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the headers",
            ));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((key, value)) = line.split_once(':')
            && key.eq_ignore_ascii_case("content-length")
        {
            length = value
                .trim()
                .parse()
                .map_err(|_| io::Error::other(format!("bad content-length {value:?}")))?;
        }
    }
    if length > MAX_BODY {
        return Err(io::Error::other(format!(
            "body of {length} bytes is too large"
        )));
    }
    Ok((start.trim_end().to_owned(), length))
}
