//! A minimal HTTP/1.1 file server on 127.0.0.1 for dataset downloads and webhook receipts.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A minimal HTTP/1.1 server on 127.0.0.1: GET serves files under `root`, POST records the
/// body and headers (webhook receiver).
pub struct FileServer {
    pub port: u16,
    pub posts: Arc<Mutex<Vec<(HashMap<String, String>, Vec<u8>)>>>,
}

impl FileServer {
    pub fn start(root: PathBuf) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let posts: Arc<Mutex<Vec<(HashMap<String, String>, Vec<u8>)>>> = Arc::default();
        let p = posts.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let root = root.clone();
                let p = p.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(s.try_clone().unwrap());
                    let mut line = String::new();
                    if r.read_line(&mut line).is_err() {
                        return;
                    }
                    let parts: Vec<&str> = line.split_whitespace().collect();
                    let (method, path) = (
                        parts.first().copied().unwrap_or(""),
                        parts.get(1).copied().unwrap_or("/"),
                    );
                    let mut headers = HashMap::new();
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = h.trim_end().split_once(':') {
                            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                        }
                    }
                    if method == "POST" {
                        let n: usize = headers
                            .get("content-length")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        let mut body = vec![0u8; n];
                        let _ = r.read_exact(&mut body);
                        p.lock().unwrap().push((headers, body));
                        let _ = s.write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        );
                        return;
                    }
                    let file = root.join(path.trim_start_matches('/'));
                    match std::fs::read(&file) {
                        Ok(bytes) => {
                            let _ = write!(s, "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", bytes.len());
                            let _ = s.write_all(&bytes);
                        }
                        Err(_) => {
                            let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                        }
                    }
                });
            }
        });
        Self { port, posts }
    }
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }
}
