//! Getting a job's dataset onto local disk as a Pick-a-Pic-schema parquet file.
//!
//! Sources: `http(s)://` (parquet, or a JSONL manifest whose images are URLs or paths relative
//! to it), `hf://datasets/<owner>/<name>[/<file or split>]` through the hub, and `file://`
//! under configured directories. Downloads are size-limited, time-limited, report progress and
//! can be cancelled. Addresses that resolve to loopback, private or link-local networks are
//! refused at connect time (the check runs in the resolver, so a DNS answer cannot change
//! between check and connect) unless the operator allows them.

use super::types::JobError;
use crate::training::dataset::{write_pairs_parquet, write_unpaired_parquet, PairRow, SOURCE_COLUMN};
use std::io::{BufRead, Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub max_bytes: u64,
    pub timeout: Duration,
    pub allow_private_networks: bool,
    /// Directories `file://` URLs may point into.
    pub file_roots: Vec<PathBuf>,
    /// Images referenced by a JSONL manifest: at most this many bytes each.
    pub max_image_bytes: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            max_bytes: 2 << 30,
            timeout: Duration::from_secs(600),
            allow_private_networks: false,
            file_roots: Vec::new(),
            max_image_bytes: 20 << 20,
        }
    }
}

/// Called with (bytes so far, total if known); returning false cancels.
pub type FetchProgress<'a> = &'a mut dyn FnMut(u64, Option<u64>) -> bool;

fn derr(m: impl Into<String>) -> JobError {
    JobError::Dataset(m.into())
}

/// True for addresses a server-side fetch must not reach by default: every range that is not
/// the public internet, including IPv6 forms that carry an IPv4 address inside them
/// (IPv4-mapped, IPv4-compatible, NAT64, 6to4), which would otherwise smuggle a private
/// IPv4 address past the check.
pub fn is_private(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            let o = v.octets();
            v.is_loopback()
                || v.is_private()
                || v.is_link_local()
                || v.is_unspecified()
                || v.is_broadcast()
                || v.is_multicast()
                || o[0] == 0 // 0/8 "this network"
                || o[0] == 100 && (o[1] & 0xC0) == 64 // 100.64/10 carrier-grade NAT
                || o[0] >= 240 // 240/4 reserved
                || o[0] == 192 && o[1] == 0 && o[2] == 0 // 192.0.0/24 protocol assignments
                || o[0] == 198 && (o[1] & 0xFE) == 18 // 198.18/15 benchmarking
                || o[0] == 192 && o[1] == 0 && o[2] == 2 // documentation
                || o[0] == 198 && o[1] == 51 && o[2] == 100
                || o[0] == 203 && o[1] == 0 && o[2] == 113
        }
        IpAddr::V6(v) => {
            let s = v.segments();
            let embedded = |hi: u16, lo: u16| {
                is_private(&IpAddr::V4(std::net::Ipv4Addr::new(
                    (hi >> 8) as u8,
                    hi as u8,
                    (lo >> 8) as u8,
                    lo as u8,
                )))
            };
            if let Some(m) = v.to_ipv4_mapped() {
                return is_private(&IpAddr::V4(m));
            }
            // ::/96 (IPv4-compatible, and :: and ::1 themselves): never a public address.
            if s[..6] == [0; 6] {
                return true;
            }
            // 64:ff9b::/96 NAT64: the IPv4 address it translates to decides.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return embedded(s[6], s[7]);
            }
            // 2002::/16 6to4: the IPv4 address in bits 16-48 decides.
            if s[0] == 0x2002 {
                return embedded(s[1], s[2]);
            }
            v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 // 64:ff9b:1::/48 local NAT64
                || s[0] == 0x2001 && s[1] == 0 // 2001::/32 Teredo (hides its IPv4 peer)
                || s[0] == 0x2001 && s[1] == 0xdb8 // documentation
                || s[0] == 0x100 && s[1..4] == [0, 0, 0] // 100::/64 discard
                || (s[0] & 0xfe00) == 0xfc00 // fc00::/7 unique local
                || (s[0] & 0xffc0) == 0xfe80 // fe80::/10 link local
                || (s[0] & 0xffc0) == 0xfec0 // fec0::/10 site local (deprecated)
        }
    }
}

fn agent(cfg: &FetchConfig) -> ureq::Agent {
    guarded_agent(cfg.allow_private_networks, cfg.timeout)
}

/// An HTTP agent whose resolver drops loopback/private/link-local addresses unless allowed:
/// the check happens where the connection's address is chosen, so a DNS answer cannot change
/// between a check and the connect. Used for dataset downloads and webhooks.
pub(crate) fn guarded_agent(allow_private: bool, timeout: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(timeout)
        .timeout_connect(Duration::from_secs(20))
        .redirects(5)
        .resolver(move |addr: &str| -> std::io::Result<Vec<SocketAddr>> {
            let all: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
            let ok: Vec<SocketAddr> = all.iter().copied().filter(|a| allow_private || !is_private(&a.ip())).collect();
            if ok.is_empty() && !all.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{addr} resolves to a loopback/private/link-local address (allow with datasets.allow_private_networks, or serve --allow-private-dataset-urls)"),
                ));
            }
            Ok(ok)
        })
        .build()
}

/// Streams a URL into `dest` with a size limit. Returns the byte count.
pub fn download(
    url: &str,
    dest: &Path,
    cfg: &FetchConfig,
    limit: u64,
    progress: FetchProgress<'_>,
) -> Result<u64, JobError> {
    let resp = agent(cfg).get(url).call().map_err(|e| match e {
        ureq::Error::Status(code, _) => derr(format!("GET {url}: HTTP {code}")),
        ureq::Error::Transport(t) => derr(format!("GET {url}: {t}")),
    })?;
    let total = resp
        .header("content-length")
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(t) = total {
        if t > limit {
            return Err(derr(format!(
                "{url} is {t} bytes, over the {limit} byte limit"
            )));
        }
    }
    let tmp = dest.with_extension("part");
    let mut file =
        std::fs::File::create(&tmp).map_err(|e| derr(format!("{}: {e}", tmp.display())))?;
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut n: u64 = 0;
    let mut last = std::time::Instant::now();
    loop {
        let k = reader
            .read(&mut buf)
            .map_err(|e| derr(format!("reading {url}: {e}")))?;
        if k == 0 {
            break;
        }
        n += k as u64;
        if n > limit {
            let _ = std::fs::remove_file(&tmp);
            return Err(derr(format!("{url} exceeds the {limit} byte limit")));
        }
        file.write_all(&buf[..k]).map_err(|e| derr(e.to_string()))?;
        if last.elapsed() > Duration::from_millis(200) {
            last = std::time::Instant::now();
            if !progress(n, total) {
                let _ = std::fs::remove_file(&tmp);
                return Err(JobError::Dataset("cancelled".into()));
            }
        }
    }
    progress(n, total);
    file.flush().map_err(|e| derr(e.to_string()))?;
    drop(file);
    std::fs::rename(&tmp, dest).map_err(|e| derr(e.to_string()))?;
    Ok(n)
}

fn is_parquet(path: &Path) -> bool {
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == b"PAR1"
}

/// Where a manifest's relative image references are resolved.
enum Base {
    Url(String),
    Dir(PathBuf),
}

/// `.` and `..` removed by the text alone; None if `..` would climb above the root.
fn lexical_normalize(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                if !out.pop() || out.as_os_str().is_empty() {
                    return None;
                }
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
}

fn file_url_refused(url: &str) -> JobError {
    JobError::Invalid(format!(
        "{url:?}: a file:// dataset URL must name an absolute path (file:///... or \
         file://localhost/...) under a directory of datasets.file_roots"
    ))
}

/// The path a `file://` URL names, if it lies under one of `file_roots`. Judged from the text
/// alone, without touching the filesystem, so a refusal (always the same message) tells
/// nothing about what exists; submission checks this before a job is queued.
pub fn file_url_path(url: &str, cfg: &FetchConfig) -> Result<PathBuf, JobError> {
    let rest = url.strip_prefix("file://").ok_or_else(|| file_url_refused(url))?;
    let path = rest.strip_prefix("localhost").unwrap_or(rest);
    if !path.starts_with('/') {
        return Err(file_url_refused(url));
    }
    let p = lexical_normalize(Path::new(path)).ok_or_else(|| file_url_refused(url))?;
    let cwd = std::env::current_dir().unwrap_or_default();
    let allowed = cfg
        .file_roots
        .iter()
        .filter_map(|r| lexical_normalize(&cwd.join(r)))
        .any(|root| p.starts_with(&root));
    if allowed {
        Ok(p)
    } else {
        Err(file_url_refused(url))
    }
}

/// At fetch time: the URL's path with symlinks resolved, still under a root.
fn resolve_file_url(url: &str, cfg: &FetchConfig) -> Result<PathBuf, JobError> {
    let p = file_url_path(url, cfg)?;
    let real = std::fs::canonicalize(&p).map_err(|e| derr(format!("{url}: {e}")))?;
    let allowed = cfg
        .file_roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .any(|root| real.starts_with(&root));
    if !allowed {
        // A symbolic link under a root that points out of every root.
        return Err(file_url_refused(url));
    }
    Ok(real)
}

/// Fetches a small file (`http(s)://`, or `file://` under a root) into `dest`, at most `limit`
/// bytes: what an evaluation's prompt list comes from.
pub fn fetch_file(url: &str, dest: &Path, cfg: &FetchConfig, limit: u64) -> Result<PathBuf, JobError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        download(url, dest, cfg, limit, &mut |_, _| true)?;
        Ok(dest.to_path_buf())
    } else if url.starts_with("file://") {
        resolve_file_url(url, cfg)
    } else {
        Err(JobError::Invalid(format!(
            "{url:?}: use an http://, https:// or file:// URL"
        )))
    }
}

/// Fetches `url` into `work_dir` and returns the parquet file to train on.
pub fn fetch_dataset(
    url: &str,
    work_dir: &Path,
    cfg: &FetchConfig,
    progress: FetchProgress<'_>,
) -> Result<PathBuf, JobError> {
    std::fs::create_dir_all(work_dir).map_err(|e| derr(format!("{}: {e}", work_dir.display())))?;
    let (local, base) = if url.starts_with("http://") || url.starts_with("https://") {
        let dest = work_dir.join("download");
        download(url, &dest, cfg, cfg.max_bytes, progress)?;
        (dest, Base::Url(url.to_string()))
    } else if url.starts_with("file://") {
        let p = resolve_file_url(url, cfg)?;
        let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
        (p, Base::Dir(dir))
    } else if let Some(rest) = url.strip_prefix("hf://datasets/") {
        let p = hub_dataset(rest)?;
        let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
        (p, Base::Dir(dir))
    } else {
        return Err(JobError::Invalid(format!(
            "dataset_url must start with http://, https://, hf://datasets/ or file://, got {url:?}"
        )));
    };
    if is_parquet(&local) {
        return Ok(local);
    }
    let size = std::fs::metadata(&local).map(|m| m.len()).unwrap_or(0);
    if size == 0 {
        return Err(derr("the dataset file is empty"));
    }
    manifest_to_parquet(&local, &base, work_dir, cfg)
}

/// A JSONL manifest, one `{caption, image_0, image_1, label_0}` per line (edit pairs add
/// `input_image`, the source image; unpaired data is `{caption, image, label}`), becomes a
/// parquet file. An image that cannot be fetched is stored empty and later skipped (and
/// counted) by the trainer, like an undecodable JPEG.
fn manifest_to_parquet(
    path: &Path,
    base: &Base,
    work_dir: &Path,
    cfg: &FetchConfig,
) -> Result<PathBuf, JobError> {
    let f = std::fs::File::open(path).map_err(|e| derr(e.to_string()))?;
    let mut rows = Vec::new();
    let mut singles = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line =
            line.map_err(|_| derr("the dataset is neither parquet nor a UTF-8 JSONL manifest"))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
            derr(format!(
                "the dataset is neither parquet nor a JSONL manifest (line {}: {e})",
                i + 1
            ))
        })?;
        let field = |k: &str| {
            v.get(k)
                .ok_or_else(|| derr(format!("manifest line {}: missing field {k}", i + 1)))
        };
        let caption = field("caption")?.as_str().unwrap_or_default().to_string();
        let number = |k: &str| {
            field(k)?
                .as_f64()
                .ok_or_else(|| derr(format!("manifest line {}: {k} must be a number", i + 1)))
        };
        let img = |k: &str| -> Result<Vec<u8>, JobError> {
            let r = field(k)?
                .as_str()
                .ok_or_else(|| derr(format!("manifest line {}: {k} must be a string", i + 1)))?;
            Ok(fetch_image(r, base, work_dir, cfg).unwrap_or_default())
        };
        if v.get("image").is_some() {
            singles.push((caption, img("image")?, number("label")?));
            continue;
        }
        let label = number("label_0")?;
        let mut row = PairRow::new(caption, img("image_0")?, img("image_1")?, label);
        if v.get(SOURCE_COLUMN).is_some() {
            row.input_image = Some(img(SOURCE_COLUMN)?);
        }
        rows.push(row);
    }
    let out = work_dir.join("pairs.parquet");
    match (rows.is_empty(), singles.is_empty()) {
        (true, true) => return Err(derr("the manifest has no rows")),
        (false, false) => {
            return Err(derr(
                "the manifest mixes pairs (image_0, image_1) and single images (image): use one",
            ))
        }
        (false, true) => write_pairs_parquet(&out, &rows, 500),
        (true, false) => write_unpaired_parquet(&out, &singles, 500),
    }
    .map_err(|e| derr(e.to_string()))?;
    Ok(out)
}

fn fetch_image(
    r: &str,
    base: &Base,
    work_dir: &Path,
    cfg: &FetchConfig,
) -> Result<Vec<u8>, JobError> {
    let tmp = work_dir.join("image.tmp");
    let url = if r.starts_with("http://") || r.starts_with("https://") {
        Some(r.to_string())
    } else if let Base::Url(b) = base {
        let cut = b.rfind('/').map(|i| &b[..=i]).unwrap_or(b);
        Some(format!("{cut}{r}"))
    } else {
        None
    };
    match (url, base) {
        (Some(u), _) => {
            download(&u, &tmp, cfg, cfg.max_image_bytes, &mut |_, _| true)?;
            let bytes = std::fs::read(&tmp).map_err(|e| derr(e.to_string()))?;
            let _ = std::fs::remove_file(&tmp);
            Ok(bytes)
        }
        (None, Base::Dir(d)) => {
            let p = std::fs::canonicalize(d.join(r)).map_err(|e| derr(format!("{r}: {e}")))?;
            // A manifest may not reach outside its own directory tree.
            let root = std::fs::canonicalize(d).map_err(|e| derr(e.to_string()))?;
            if !p.starts_with(&root) {
                return Err(derr(format!("{r} leaves the manifest's directory")));
            }
            std::fs::read(&p).map_err(|e| derr(format!("{r}: {e}")))
        }
        (None, Base::Url(_)) => unreachable!("relative references under a URL base become URLs"),
    }
}

/// `<owner>/<name>[/<file or split>]` on the hub: a named file is downloaded as is; a split
/// name (or nothing, meaning `train`) takes the split's first parquet shard.
#[cfg(feature = "hub")]
fn hub_dataset(rest: &str) -> Result<PathBuf, JobError> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};
    let parts: Vec<&str> = rest.splitn(3, '/').collect();
    if parts.len() < 2 {
        return Err(JobError::Invalid(
            "hf:// dataset URLs look like hf://datasets/<owner>/<name>[/<file or split>]".into(),
        ));
    }
    let repo_id = format!("{}/{}", parts[0], parts[1]);
    let api = ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| derr(e.to_string()))?;
    let repo = api.repo(Repo::new(repo_id.clone(), RepoType::Dataset));
    let target = parts.get(2).copied().unwrap_or("train");
    if target.ends_with(".parquet") || target.ends_with(".jsonl") {
        return repo
            .get(target)
            .map_err(|e| derr(format!("{repo_id}/{target}: {e}")));
    }
    let info = repo.info().map_err(|e| derr(format!("{repo_id}: {e}")))?;
    let mut shards: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| {
            f.ends_with(".parquet")
                && f.rsplit('/')
                    .next()
                    .map(|n| n.starts_with(target))
                    .unwrap_or(false)
        })
        .collect();
    shards.sort();
    let first = shards
        .first()
        .ok_or_else(|| derr(format!("{repo_id} has no parquet shard for split {target}")))?;
    repo.get(first)
        .map_err(|e| derr(format!("{repo_id}/{first}: {e}")))
}

#[cfg(not(feature = "hub"))]
fn hub_dataset(rest: &str) -> Result<PathBuf, JobError> {
    Err(JobError::Invalid(format!(
        "hf://datasets/{rest}: this build has no hub support"
    )))
}

#[cfg(test)]
mod tests {
    use super::is_private;
    use std::net::IpAddr;

    #[test]
    fn every_special_range_is_private_and_public_addresses_are_not() {
        let private = [
            "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0",
            "0.1.2.3", "100.64.0.1", "224.0.0.1", "240.0.0.1", "255.255.255.255", "192.0.0.8",
            "198.18.0.1", "192.0.2.1", "::", "::1", "::127.0.0.1", "::7f00:1", "::10.0.0.1",
            "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::7f00:1", "64:ff9b::a00:1",
            "64:ff9b:1::1", "2002:7f00:1::", "2002:a00:1::1", "2001::1", "2001:db8::1", "100::1",
            "fc00::1", "fd12:3456::1", "fe80::1", "fec0::1", "ff02::1",
        ];
        for a in private {
            let ip: IpAddr = a.parse().unwrap();
            assert!(is_private(&ip), "{a} should be refused");
        }
        let public = [
            "8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2a00:1450:4001::1",
            "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1",
        ];
        for a in public {
            let ip: IpAddr = a.parse().unwrap();
            assert!(!is_private(&ip), "{a} is public");
        }
    }
}

#[cfg(test)]
mod file_url_tests {
    use super::{file_url_path, FetchConfig};
    use std::path::PathBuf;

    #[test]
    fn file_urls_are_judged_by_their_text_under_the_roots() {
        let cfg = FetchConfig {
            file_roots: vec![PathBuf::from("/srv/datasets")],
            ..FetchConfig::default()
        };
        for ok in [
            "file:///srv/datasets/p.parquet",
            "file://localhost/srv/datasets/sub/p.parquet",
            "file:///srv/datasets/./sub/../p.parquet",
            "file:///srv/datasets/does-not-exist.parquet",
        ] {
            assert!(file_url_path(ok, &cfg).is_ok(), "{ok}");
        }
        let message = |url: &str| file_url_path(url, &cfg).unwrap_err().to_string().replace(url, "<url>");
        let refused = [
            "file:///etc/passwd",
            "file:///etc/does-not-exist",
            "file:///srv/datasets/../../etc/passwd",
            "file://srv/datasets/p.parquet",
            "file://localhostsrv/datasets/p.parquet",
            "file:///srv/datasets-evil/p.parquet",
        ];
        // The same words for every refusal: whether a path exists cannot be probed.
        let first = message(refused[0]);
        for url in refused {
            assert_eq!(message(url), first, "{url}");
        }
        assert!(first.contains("datasets.file_roots"), "{first}");
    }
}
